"""The program: ``fun``'s jaxpr as a flat list of ops, and how one op is evaluated.

``jit`` and ``remat`` calls are inlined (their bodies are ordinary ops to both passes);
every other equation, :data:`~fwdgrad_jax.perturbation.markers.site_p` included, is one
op. Values are named by integer ids; literals and closed-over constants become ids with
a value in :attr:`Program.consts`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
from jax.custom_derivatives import SymbolicZero
from jax.extend import core as jex_core
from jax.extend.core import primitives as jex_primitives

from fwdgrad_jax.perturbation.markers import local_loss_p, site_p

PyTree = Any


@dataclasses.dataclass
class Op:
  prim: Any  # a jax Primitive (``site_p`` for a site marker)
  params: dict[str, Any]
  ins: list[int]
  outs: list[int]  # -1 for a dropped output
  shapes: list[tuple[int, ...]]  # of outs


@dataclasses.dataclass
class Program:
  ops: list[Op]
  consts: dict[int, Any]  # id -> value (closed-over constants and literals)
  ins: list[int]
  outs: list[int]
  num_ids: int


# How a call primitive's equation gives its body: (closed jaxpr's jaxpr, its consts).
# jax < 0.5 names the jit primitive ``pjit_p``.
_jit_p = getattr(jex_primitives, "jit_p", None) or jex_primitives.pjit_p
INLINE_RULES: dict[Any, Callable[[Any], tuple[Any, Sequence[Any]]]] = {
  _jit_p: lambda params: (params["jaxpr"].jaxpr, params["jaxpr"].consts),
  jex_primitives.remat_p: lambda params: (params["jaxpr"], []),
}


def flatten(closed: Any) -> Program:
  """Inlines ``jit``/``remat`` calls into one flat :class:`Program`."""
  ops: list[Op] = []
  consts: dict[int, Any] = {}
  counter = [0]

  def fresh() -> int:
    counter[0] += 1
    return counter[0] - 1

  def walk(jaxpr, const_vals, in_ids) -> list[int]:
    env: dict[Any, int] = {}
    for v, c in zip(jaxpr.constvars, const_vals):
      i = fresh()
      consts[i] = c
      env[v] = i
    for v, i in zip(jaxpr.invars, in_ids):
      env[v] = i

    def read(v) -> int:
      if isinstance(v, jex_core.Literal):
        i = fresh()
        consts[i] = v.val
        return i
      return env[v]

    for eqn in jaxpr.eqns:
      ins = [read(v) for v in eqn.invars]
      inline = INLINE_RULES.get(eqn.primitive)
      if inline is not None:
        outs = walk(*inline(eqn.params), ins)
      else:
        outs = [fresh() for _ in eqn.outvars]
        shapes = [tuple(getattr(v.aval, "shape", ())) for v in eqn.outvars]
        ops.append(Op(eqn.primitive, dict(eqn.params), ins, outs, shapes))
      for v, i in zip(eqn.outvars, outs):
        if not isinstance(v, jex_core.DropVar):
          env[v] = i
    return [read(v) for v in jaxpr.outvars]

  in_ids = [fresh() for _ in closed.jaxpr.invars]
  out_ids = walk(closed.jaxpr, closed.consts, in_ids)
  return Program(ops, consts, in_ids, out_ids, counter[0])


def trace(fun: Callable[..., Any], params: PyTree, args: tuple, kwargs: dict):
  """``fun(params, *args, **kwargs)`` as (:class:`Program`, flat args, output treedef).

  The program's inputs are the leaves of ``params`` followed by the flat args.
  """
  leaves = jax.tree.leaves(params)
  flat_args, args_tree = jax.tree.flatten((args, kwargs))
  treedef = jax.tree.structure(params)
  out_tree_box = []

  def flat_fun(*flat):
    p = jax.tree.unflatten(treedef, flat[: len(leaves)])
    a, kw = jax.tree.unflatten(args_tree, flat[len(leaves) :])
    out = fun(p, *a, **kw)
    out_flat, out_tree = jax.tree.flatten(out)
    out_tree_box.append(out_tree)
    return out_flat

  closed = jax.make_jaxpr(flat_fun)(*leaves, *flat_args)
  return flatten(closed), list(flat_args), out_tree_box[0]


def bind(op: Op, args: Sequence[Any]) -> list[Any]:
  """Evaluates one op on values (primal only, or under an outer jvp/vmap trace)."""
  if op.prim is site_p or op.prim is local_loss_p:
    return [args[0]]
  out = op.prim.bind(*args, **_bind_params(op))
  return list(out) if op.prim.multiple_results else [out]


def evaluate(prog: Program, values: Sequence[Any], ids: Sequence[int]) -> list[Any]:
  """The values of ``ids`` in ``prog`` at inputs ``values`` (every op bound in order)."""
  P: dict[int, Any] = dict(prog.consts)
  P.update(zip(prog.ins, values))
  for op in prog.ops:
    for o, v in zip(op.outs, bind(op, [P[i] for i in op.ins])):
      P[o] = v
  return [P[i] for i in ids]


def _bind_params(op: Op) -> dict[str, Any]:
  # jax >= 0.7 returns the params only; older versions (subfuns, params).
  params = op.prim.get_bind_params(op.params)
  if isinstance(params, tuple):
    subfuns, params = params
    if subfuns:
      raise NotImplementedError(f"{op.prim} needs subfuns to be rebound")
  return params


def jvp_op(op: Op, primals: Sequence[Any], tangents: Sequence[Any], k: int):
  """(primal outs, tangent outs (k, ...) or None) of one op; the primal once, tangents vmapped."""
  live = [i for i, t in enumerate(tangents) if t is not None]
  if not live:
    return bind(op, primals), [None] * len(op.outs)

  def f(*live_primals):
    args = list(primals)
    for i, p in zip(live, live_primals):
      args[i] = p
    return bind(op, args)

  live_p = [primals[i] for i in live]
  live_t = [tangents[i] for i in live]
  if k == 1:
    # vmap over a size-1 axis batches every tangent op, which XLA:CPU runs slower.
    out_p, out_t = jax.jvp(f, live_p, [t[0] for t in live_t])
    out_t = [None if is_zero(t) else t[None] for t in out_t]
    return out_p, out_t

  def one(ts):
    return jax.jvp(f, live_p, list(ts))

  out_p, out_t = jax.vmap(one, out_axes=(None, 0))(live_t)
  return out_p, list(out_t)


def is_zero(t: Any) -> bool:
  return t is None or isinstance(t, SymbolicZero)
