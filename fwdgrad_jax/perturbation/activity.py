"""Activity perturbation: tangents at the outputs of parameter-consuming ops, or at marked sites.

The program is cut into blocks, one per site (the ops from the previous sites to it) and a
tail; each block runs once, its jvp carrying the tangents of earlier sites, inside a
``jax.vjp`` that gives its parameters' local VJP at the site's gradient estimate.

With ``guess=True`` (``tangents="local_guess"``) each site's tangents start with a
*guess*: the gradient of the site's own marked local losses through its head only (the
ops from the site to those losses that cross no other site), computed by a reverse pass
of the head alone when the site is reached (Fournier et al. 2023).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from fwdgrad_jax import tangents as tangents_lib
from fwdgrad_jax.perturbation import credit, draws
from fwdgrad_jax.perturbation.markers import local_loss_p, site_p
from fwdgrad_jax.perturbation.program import Op, Program, bind, trace
from fwdgrad_jax.perturbation.rules import LINEAR_PRIMITIVES

PyTree = Any

_PARAM, _DATA = 1, 2


@dataclasses.dataclass
class _Block:
  """Ops from the previous sites to one site (or to the outputs, for the tail)."""

  ops: list[Op]
  recipe: list[Op]  # parameter-only ops the block's ops need, recomputed inside it
  leaves: list[int]  # parameter leaves it consumes (through its ops or recipe)
  act_ins: list[int]  # ids read from other blocks (they may carry tangents)
  outs: list[int]  # ids it produces that are read elsewhere; the site (if any) first
  site: int | None


def _dependencies(prog: Program, n_leaves: int) -> dict[int, int]:
  # Closed-over arrays and jaxpr constants are data (``lambda q: loss(q, x, y)`` with x, y
  # closed over, as optax code writes it); literals and other scalars are neither.
  dep = {i: _DATA if jnp.ndim(v) >= 1 else 0 for i, v in prog.consts.items()}
  for j, pid in enumerate(prog.ins):
    dep[pid] = _PARAM if j < n_leaves else _DATA
  for op in prog.ops:
    d = 0
    for i in op.ins:
      d |= dep[i]
    for o in op.outs:
      dep[o] = d
  return dep


def _consumers(prog: Program) -> dict[int, list[int]]:
  uses: dict[int, list[int]] = {}
  for j, op in enumerate(prog.ops):
    for i in op.ins:
      uses.setdefault(i, []).append(j)
  for i in prog.outs:
    uses.setdefault(i, []).append(-1)
  return uses


def _is_param_consumer(op: Op, dep: dict[int, int]) -> bool:
  deps = [dep[i] for i in op.ins]
  return any(d == _PARAM for d in deps) and any(d & _DATA for d in deps)


def _find_sites(prog: Program, dep, uses) -> list[int]:
  """Op indices whose first output is perturbed: marked sites, else every parameter
  consumer, extended over

  - the sole-consumer chain of further parameter consumers, so that a bias added after a
    matmul is part of that matmul's output;
  - a normalization that follows it (LayerNorm, BatchNorm, RMSNorm, GroupNorm): ops that
    read only that output, each other and parameters, up to the op closing the
    normalization (:func:`_normalization_end`). The statistics branch off the output and
    meet it again in that region; a site inside it would leave them to two blocks. Where
    the output is also read past the normalization (a skip connection around it and a
    linear layer), the output stays a site and the normalization's end is a second one.
  """
  marked = [j for j, op in enumerate(prog.ops) if op.prim is site_p and dep[op.outs[0]] & _DATA]
  if marked:
    return marked
  consumers = [
    j for j, op in enumerate(prog.ops) if op.prim is not site_p and _is_param_consumer(op, dep)
  ]
  if not any(prog.ops[j].prim in LINEAR_PRIMITIVES for j in consumers):
    raise ValueError(
      "perturbation='activity': fun has no parameter-consuming linear op (dot_general / "
      "conv_general_dilated with a parameter on one side and data on the other), so there "
      "is no activity to perturb."
    )
  to_loss = _loss_path(prog)
  in_chain, sites = set(), []
  for j in consumers:
    if j in in_chain:
      continue
    end = j
    while True:
      while len(op_out_uses := uses.get(prog.ops[end].outs[0], [])) == 1:
        nxt = op_out_uses[0]
        if nxt < 0 or not _is_param_consumer(prog.ops[nxt], dep) or len(prog.ops[nxt].outs) != 1:
          break
        end = nxt
        in_chain.add(nxt)
      region = _normalization_end(prog, dep, uses, end, to_loss)
      if region is None:
        break
      e, region_ops, joined = region
      in_chain.update(region_ops)
      if not joined:  # the output is also read past the normalization (a skip): both sites
        sites.append(end)
      end = e
    sites.append(end)
  return sites


# Ops a normalization region never extends over: another layer's linear op starts a site
# of its own, and markers keep their meaning.
def _region_stop(op: Op) -> bool:
  return (
    op.prim in LINEAR_PRIMITIVES
    or op.prim is site_p
    or op.prim is local_loss_p
    or op.prim is credit.STOP_GRADIENT
  )


def _normalization_end(
  prog: Program, dep, uses, start: int, to_loss: set[int]
) -> tuple[int, set[int], bool] | None:
  """The op that closes the normalization after op ``start``, if any.

  The region: the ops after ``start`` whose data inputs are ``start``'s output or the
  region's own values (parameters and constants may enter), never a linear op or a marker.
  A candidate end ``e`` is *closed* when every value of the region that ``e`` depends on
  (``start``'s output included) is read, on the loss path, only by ops that ``e`` depends
  on: the block of the site ``e`` then holds every path from ``start`` to the loss, the
  statistics included. Reads off the loss path (BatchNorm's running averages) do not
  count. The end is the first closed op at or after the region's last parameter consumer
  that depends on it (LayerNorm's bias add; RMSNorm's ``x * (rsqrt(…) * scale)``, whose
  last parameter consumer is the scale multiply of the statistics; a residual sum around
  the normalization); if none closes, the same for the parameter consumer before it.

  Where no op closes so because ``start``'s output is also read past the region (a skip
  connection around the normalization and a linear layer), the first op that closes when
  those reads are allowed ends it, ``joined`` False: ``start``'s output stays a site (a
  site's output may be read anywhere) and ``e`` is another.

  Returns:
    ``(e, the region's ops up to e, joined)``, or None (no parameter consumer in the
    region, or none closes).
  """
  v = prog.ops[start].outs[0]
  ids, region = {v}, []
  for j in range(start + 1, len(prog.ops)):
    op = prog.ops[j]
    if _region_stop(op) or not any(i in ids for i in op.ins):
      continue
    if any(dep[i] & _DATA and i not in ids for i in op.ins):
      continue  # another activation or the labels join here: the region ends before
    region.append(j)
    ids.update(op.outs)
  producer = {o: j for j in region for o in prog.ops[j].outs}

  def upstream(e: int) -> set[int]:
    inside, todo = set(), [e]
    while todo:
      j = todo.pop()
      if j not in inside:
        inside.add(j)
        todo.extend(producer[i] for i in prog.ops[j].ins if i in producer)
    return inside

  def closed(e: int, inside: set[int], joined: bool) -> bool:
    values = {o for j in inside if j != e for o in prog.ops[j].outs} | ({v} if joined else set())
    return all(
      (r in inside) if r >= 0 else o != prog.outs[0]
      for o in values
      for r in uses.get(o, [])
      if r < 0 or r in to_loss
    )

  param_consumers = [n for n, j in enumerate(region) if _is_param_consumer(prog.ops[j], dep)]
  for joined in (True, False):
    for n in reversed(param_consumers):
      for e in region[n:]:
        if len(prog.ops[e].outs) != 1:
          continue
        inside = upstream(e)
        if region[n] in inside and closed(e, inside, joined):
          return e, inside, joined
  return None


def _loss_path(prog: Program) -> set[int]:
  """Ops the loss (the first output) depends on differentiably: a stop-gradient use has
  no derivative, so the paths through it do not count."""
  producer = {o: j for j, op in enumerate(prog.ops) for o in op.outs}
  to_loss: set[int] = set()
  todo = [prog.outs[0]]
  while todo:
    j = producer.get(todo.pop())
    if j is not None and j not in to_loss and prog.ops[j].prim is not credit.STOP_GRADIENT:
      to_loss.add(j)
      todo.extend(prog.ops[j].ins)
  return to_loss


def _blocks(
  prog: Program, n_leaves: int, dep, uses, sites: list[int], keep: frozenset[int] = frozenset()
) -> list[_Block]:
  """Partitions the ops that depend on both parameters and data into site blocks and a tail.

  The ids in ``keep`` (the marked local losses) are outputs of the blocks that make them.
  """
  producer = {o: j for j, op in enumerate(prog.ops) for o in op.outs}
  site_out = {prog.ops[j].outs[0]: j for j in sites}
  assigned: dict[int, int] = {}  # op index -> block index

  def closure(roots: list[int], b: int) -> list[int]:
    """Mixed ops reachable backward from ``roots`` (ids), stopping at other blocks' ops."""
    todo, found = list(roots), []
    while todo:
      i = todo.pop()
      j = producer.get(i)
      if j is None or j in assigned or dep[i] != _PARAM | _DATA:
        continue
      if i in site_out and site_out[i] != found_site[b]:
        continue
      assigned[j] = b
      found.append(j)
      todo.extend(prog.ops[j].ins)
    return sorted(found)

  found_site: dict[int, int] = {}
  groups: list[tuple[list[int], int | None]] = []
  for b, j in enumerate(sites):
    found_site[b] = j
    groups.append((closure([prog.ops[j].outs[0]], b), j))
  tail_b = len(sites)
  found_site[tail_b] = -1
  groups.append((closure(list(prog.outs), tail_b), None))

  def recipe_of(op_ids: list[int]) -> tuple[list[Op], list[int]]:
    """Parameter-only ops the block reads, back to the leaves."""
    todo = [i for j in op_ids for i in prog.ops[j].ins if dep[i] == _PARAM]
    seen, ops, leaves = set(), set(), set()
    while todo:
      i = todo.pop()
      if i in seen:
        continue
      seen.add(i)
      if i in prog.ins[:n_leaves]:
        leaves.add(prog.ins.index(i))
        continue
      j = producer.get(i)
      if j is not None:
        ops.add(j)
        todo.extend(x for x in prog.ops[j].ins if dep[x] == _PARAM)
    return [prog.ops[j] for j in sorted(ops)], sorted(leaves)

  loss_id = prog.outs[0]
  to_loss = _loss_path(prog)

  blocks = []
  for b, (op_ids, site_j) in enumerate(groups):
    ops = [prog.ops[j] for j in op_ids]
    made = {o for op in ops for o in op.outs}
    act_ins = sorted({i for op in ops for i in op.ins if dep[i] & _DATA and i not in made})
    recipe, leaves = recipe_of(op_ids)
    site_id = prog.ops[site_j].outs[0] if site_j is not None else None
    outs = [] if site_id is None else [site_id]
    for op in ops:
      for o in op.outs:
        if o == site_id:
          continue
        readers = uses.get(o, [])
        outside = [r for r in readers if r < 0 or assigned.get(r) != b]
        if outside:
          # Reads that do not lead to the loss (BatchNorm's running statistics returned as
          # aux, or left dead by a function that drops them) need the primal only: the
          # block's VJP misses no path of the loss through them.
          on_loss_path = o == loss_id or any(r >= 0 and r in to_loss for r in outside)
          if site_j is not None and on_loss_path:
            raise ValueError(
              "perturbation='activity': a value computed from parameters inside the block "
              f"of site #{b} (shape {op.shapes[op.outs.index(o)]}) is also used outside "
              "that block, so its parameters' local VJP would miss that path. Typical "
              "cause: a skip (residual) connection around a block that holds a linear layer "
              "(a transformer or ResNet block); fix: mark the activations with "
              "fwdgrad_jax.site(...), the block's input that the skip carries and the "
              "block's output (marked sites replace the automatic ones)."
            )
          outs.append(o)
        elif o in keep:
          outs.append(o)
    blocks.append(_Block(ops, recipe, leaves, act_ins, outs, site_id))
  return blocks


def _run_block(
  block: _Block,
  P: dict[int, Any],
  T: dict[int, Any],
  leaf_ids: list[int],
  cot_index: int | None,
  k: int,
):
  """Evaluates a block once: primal, the tangents from earlier sites, and the VJP closure.

  Returns (out primals, out tangents, vjp_fn) where ``vjp_fn(cotangent of outs[cot_index])``
  gives the block's leaves' gradient; the jvp of the k tangents runs inside the vjp's
  function as auxiliary output, so the block's forward pass is evaluated once.
  """
  live = [i for i in block.act_ins if T.get(i) is not None]
  dead = [i for i in block.act_ins if T.get(i) is None]

  def forward(leaves: tuple, live_vals: tuple) -> list[Any]:
    env = {i: P[i] for i in dead}
    env.update(zip(live, live_vals))
    for li, v in zip(block.leaves, leaves):
      env[leaf_ids[li]] = v
    for op in block.recipe + block.ops:
      for o, val in zip(op.outs, bind(op, [env[i] if i in env else P[i] for i in op.ins])):
        env[o] = val
    return [env[o] for o in block.outs]

  def with_tangents(leaves):
    fwd = lambda *xs: forward(leaves, xs)
    if not live:
      outs = fwd()
      return outs, [None] * len(outs)
    primals = [P[i] for i in live]
    tans = [T[i] for i in live]
    if k == 1:
      outs, touts = jax.jvp(fwd, primals, [t[0] for t in tans])
      return outs, [t[None] for t in touts]
    outs, touts = jax.vmap(lambda ts: jax.jvp(fwd, primals, list(ts)), out_axes=(None, 0))(tans)
    return outs, touts

  leaves = tuple(P[leaf_ids[li]] for li in block.leaves)
  if cot_index is None or not block.leaves:
    outs, touts = with_tangents(leaves)
    return outs, touts, None

  def main_and_aux(leaves):
    outs, touts = with_tangents(leaves)
    return outs[cot_index], (outs, touts)

  _, vjp_fn, (outs, touts) = jax.vjp(main_and_aux, leaves, has_aux=True)
  return outs, touts, vjp_fn


def _heads(
  prog: Program, site_ids: list[int], losses: list[int]
) -> list[tuple[list[Op], list[int]]]:
  """For each site, its head: the ops from the site to its own marked losses, and those losses.

  A site's own losses are the marked losses it reaches differentiably without crossing
  another site (a stop-gradient cuts the path, as in :func:`credit.unreached`); its head
  is the ops between the site and those losses, in program order, a stop-gradient inside
  the head included (a ``logsumexp``'s, evaluated and not differentiated). A site that
  reaches no marked loss that way has an empty head.
  """
  producer = {o: j for j, op in enumerate(prog.ops) for o in op.outs}
  site_set = set(site_ids)
  out = []
  for s in site_ids:
    reached, depends, depends_ops = {s}, {s}, set()
    for j, op in enumerate(prog.ops):
      # Another site's op ends the head: what follows it is that site's.
      if any(o in site_set and o != s for o in op.outs):
        continue
      if any(i in depends for i in op.ins):
        depends.update(op.outs)
        depends_ops.add(j)
      if op.prim is not credit.STOP_GRADIENT and any(i in reached for i in op.ins):
        reached.update(op.outs)
    own = [ell for ell in losses if ell in reached]
    need, todo = set(), list(own)
    while todo:
      j = producer.get(todo.pop())
      if j is None or j in need or j not in depends_ops:
        continue
      need.add(j)
      todo.extend(prog.ops[j].ins)
    out.append(([prog.ops[j] for j in sorted(need)], own))
  return out


def _guess(
  site: int, b: int, head: tuple[list[Op], list[int]], P: dict[int, Any], per_example: bool
) -> jax.Array:
  """The unit-norm gradient of the site's own losses through its head, at the primal values.

  Normalised per example (per-example losses) or over the whole site (a scalar loss); a
  zero gradient (no head, or a zero-initialised head) stays zero.
  """
  ops, own = head
  z = P[site]
  if not own:
    return jnp.zeros_like(z)
  made = {site} | {o for op in ops for o in op.outs}
  for op in ops:
    for i in op.ins:
      if i not in made and i not in P:
        raise ValueError(
          f"tangents='local_guess': the head of site #{b} (the ops from the site to its own "
          "local losses) reads a value computed after the site from another site's "
          "activity, so its guess cannot be computed when the site is reached; give each "
          "head only its own site's output (and parameters, data)."
        )

  def head_losses(zv):
    env = {site: zv}
    for op in ops:
      for o, val in zip(op.outs, bind(op, [env[i] if i in env else P[i] for i in op.ins])):
        env[o] = val
    return [env[ell] for ell in own]

  vals, vjp_fn = jax.vjp(head_losses, z)
  (g,) = vjp_fn([jnp.ones_like(v) for v in vals])
  g = jax.lax.stop_gradient(g)  # a tangent: a direction, not differentiated
  axes = tuple(range(1 if per_example else 0, g.ndim))
  sq = jnp.sum(jnp.square(g.astype(jnp.float32)), axis=axes, keepdims=True)
  inv = jax.lax.rsqrt(jnp.maximum(sq, jnp.finfo(jnp.float32).tiny))
  return g * inv.astype(g.dtype)


def _out_ndim(prog: Program, i: int) -> int:
  """The rank of value ``i`` (the loss), from its producer's recorded shapes."""
  for op in prog.ops:
    if i in op.outs:
      return len(op.shapes[op.outs.index(i)])
  return jnp.ndim(prog.consts.get(i, 0.0))


def _activity_pass(
  prog: Program,
  values: list[Any],
  n_leaves: int,
  words: jax.Array,
  k: int,
  scheme: str,
  guess: bool = False,
):
  """Runs the program with activity tangents; returns what the aggregation needs.

  With ``guess``, every site's tangents are (S + k − 1, …): S guess rows (row s is site
  s's guess at site s, zero at the others) then k − 1 random draws.
  """
  dep = _dependencies(prog, n_leaves)
  uses = _consumers(prog)
  sites = _find_sites(prog, dep, uses)
  losses = credit.loss_ids(prog)
  blocks = _blocks(prog, n_leaves, dep, uses, sites, frozenset(losses))
  P: dict[int, Any] = dict(prog.consts)
  P.update(zip(prog.ins, values))
  T: dict[int, Any] = {}
  # Ops that depend on parameters only, or on data only, carry no tangent: run them first.
  for op in prog.ops:
    if dep[op.outs[0]] != _PARAM | _DATA:
      for o, v in zip(op.outs, bind(op, [P[i] for i in op.ins])):
        P[o] = v
  draw = draws.normal if scheme == "normal" else draws.rademacher
  loss_id = prog.outs[0]
  k_random, k_total = k, k
  if guess:
    site_list = [b.site for b in blocks if b.site is not None]
    heads = _heads(prog, site_list, losses)
    if not any(own for _, own in heads):
      raise ValueError(
        "tangents='local_guess': no activity site reaches a fwdgrad_jax.local_loss marker "
        "through its own head (without crossing another site or a stop-gradient), so there "
        "is no guess; mark the local losses (fwdgrad_jax.local_loss) and the blocks' "
        "outputs (fwdgrad_jax.site)."
      )
    per_example = _out_ndim(prog, loss_id) == 1
    k_random, k_total = k - 1, len(site_list) + k - 1
  site_tangents, vjps = [], []
  n_site = 0
  for b, block in enumerate(blocks):
    if block.site is None:  # the tail: its cotangent is exact, d loss / d loss
      cot = block.outs.index(loss_id) if loss_id in block.outs else None
    else:
      cot = 0
    outs, touts, vjp_fn = _run_block(block, P, T, prog.ins, cot, k_total)
    for o, p, t in zip(block.outs, outs, touts):
      P[o], T[o] = p, t
    if block.site is not None:
      z = P[block.site]
      shape, dtype = jnp.shape(z), jnp.result_type(z)
      u = draw(words, b, draws.SALT_SITE, (k_random, *shape), dtype) if k_random else None
      u = None if u is None else tangents_lib.materialize(u, words)
      if guess:
        g = _guess(block.site, n_site, heads[n_site], P, per_example)
        rows = jnp.zeros((len(site_list), *shape), dtype).at[n_site].set(g.astype(dtype))
        u = rows if u is None else jnp.concatenate([rows, u])
      n_site += 1
      T[block.site] = u if T.get(block.site) is None else T[block.site] + u
      site_tangents.append(u)
    vjps.append(vjp_fn)
  outs_p = [P[i] for i in prog.outs]
  loss_t = T.get(loss_id)
  # Each site's marked losses that it does not reach (none without markers).
  site_ids = [b.site for b in blocks if b.site is not None]
  unreached = credit.unreached(prog, site_ids, losses)
  loss_jvps = [T.get(i) for i in losses]
  return outs_p, loss_t, site_tangents, vjps, blocks, (unreached, loss_jvps)


def _per_example_check(site_tangents: list[jax.Array], batch: int) -> None:
  for j, u in enumerate(site_tangents):
    if u.ndim < 2 or u.shape[1] != batch:
      raise ValueError(
        "perturbation='activity' with per-example losses: every perturbed activation needs "
        f"the batch axis ({batch}) first, but site #{j} has shape {u.shape[1:]}. Return a "
        "scalar loss instead, or put the batch axis first."
      )


def _sliced(u: jax.Array, reached: list[jax.Array | None], per_example: bool) -> tuple[int, ...]:
  """The slice axes L of a site whose reached losses all have shape (batch, *L), L ≠ ().

  Such a site, of shape (batch, *L, *F), is credited per slice: its elements [b, l, :]
  with the directional derivative of the losses' elements [b, l] only. () otherwise.
  """
  if not per_example or not reached or any(t is None for t in reached):
    return ()
  shapes = {t.shape[2:] for t in reached}
  if len(shapes) != 1:
    return ()
  (lead,) = shapes
  return lead if lead and u.shape[2 : 2 + len(lead)] == lead and u.ndim > 2 + len(lead) else ()


def activity_estimate(
  fun: Callable[..., Any],
  params: PyTree,
  args: tuple,
  kwargs: dict,
  *,
  key: jax.Array,
  num_tangents: int,
  tangents: str,
  aggregate: Callable[[PyTree, jax.Array], PyTree],
  jvp_hook: Callable[[jax.Array], jax.Array] | None,
  ratio_of: Callable[[int], float] | None = None,
  guess: bool = False,
):
  """Activity perturbation: (outputs, gradient estimate of the (mean) loss, n perturbed).

  ``aggregate(site tangents, d)`` maps the sites' tangent batch (a list, leaves (k, …))
  and the directional derivatives d — (k,) for a scalar loss, (k, batch) for
  per-example losses — to the estimate of each site's gradient. With ``guess`` the
  batch is the S sites' local guesses followed by k − 1 random tangents (see
  :func:`_activity_pass`).

  ``ratio_of(n)``, if given, is the expected length ratio of an estimate in n dimensions
  (``rescale=True``): each site's estimate is divided by it for the dimension its
  credited d mixes — all sites' together without local losses, the sites that share
  a credited d with them, or one slice of a sliced site — before its block's VJP; the
  tail after the last site has an exact gradient and is not rescaled.
  """
  leaves, treedef = jax.tree.flatten(params)
  prog, flat_args, out_tree = trace(fun, params, args, kwargs)
  outs_p, d, site_tangents, vjps, blocks, (unreached, loss_jvps) = _activity_pass(
    prog,
    leaves + flat_args,
    len(leaves),
    tangents_lib.key_words(key),
    num_tangents,
    tangents,
    guess,
  )
  loss = outs_p[0]
  per_example = jnp.ndim(loss) == 1
  if d is None:  # the loss does not depend on any activity: nothing to estimate
    k_total = site_tangents[0].shape[0] if site_tangents else num_tangents
    d = jnp.zeros((k_total, *jnp.shape(loss)), jnp.result_type(loss))
  if per_example:
    _per_example_check(site_tangents, loss.shape[0])
  hook = jvp_hook if jvp_hook is not None else (lambda x: x)
  per_ex = lambda u: math.prod(u.shape[2 if per_example else 1 :])  # noqa: E731
  # Local losses: each site's d is credited with the marked losses it reaches only; the
  # sites that share a credited d share one aggregation (all sites' tangents, as the
  # orthogonal projection couples them), of which they take their own part. Without
  # markers every site has the empty key: one aggregation of d, as before. A site whose
  # losses are sliced like it (Ren et al.'s loss per patch and channel group) is
  # aggregated per slice, with its slice's d.
  reached = [[loss_jvps[j] for j in range(len(loss_jvps)) if j not in kb] for kb in unreached]
  slices = [_sliced(u, r, per_example) for u, r in zip(site_tangents, reached)]
  cots: list[Any] = [None] * len(site_tangents)
  ns = [0] * len(site_tangents)
  plain = [b for b, sl in enumerate(slices) if not sl]
  by_key = credit.credited(d, loss_jvps, [unreached[b] for b in plain])
  n_losses = len(loss_jvps)
  for key_, dk in by_key.items():
    agg = aggregate(site_tangents, hook(dk))
    # The sites whose tangents this d mixes: those that reach one of its losses (all
    # sites without markers).
    held = [j for j in range(n_losses) if j not in key_]
    mixed = [c for c in range(len(site_tangents)) if not n_losses
             or any(j not in unreached[c] for j in held)]  # fmt: skip
    for b in plain:
      if unreached[b] == key_:
        cots[b] = agg[b]
        ns[b] = sum(per_ex(site_tangents[c]) for c in mixed)
  if len(plain) < len(site_tangents):
    rest = credit.unmarked(d, loss_jvps)  # the total's part no marked loss holds
  for b, lead in enumerate(slices):
    if not lead:
      continue
    u = site_tangents[b]
    k, batch = u.shape[:2]
    dk = sum(reached[b]).astype(d.dtype)
    dk = dk + rest.reshape(rest.shape + (1,) * len(lead))
    rows = batch * math.prod(lead)
    (g,) = aggregate([u.reshape(k, rows, -1)], hook(dk.reshape(k, rows)))
    cots[b] = g.reshape(u.shape[1:])
    ns[b] = math.prod(u.shape[2 + len(lead) :])
  scale = 1.0 / loss.shape[0] if per_example else 1.0
  grads = [jnp.zeros_like(p) for p in leaves]
  for b, (block, vjp_fn) in enumerate(zip(blocks, vjps)):
    if vjp_fn is None:
      continue
    if block.site is None:  # the tail: d(mean loss)/d loss, exact
      cot = jnp.full(jnp.shape(loss), scale, jnp.result_type(loss))
    else:
      cot = cots[b] * scale
      if ratio_of is not None:
        cot = cot / ratio_of(max(ns[b], 1))
    (g,) = vjp_fn(cot.astype(jnp.result_type(cot)))
    for li, gi in zip(block.leaves, g):
      grads[li] = grads[li] + gi
  outs_p[0] = jnp.mean(loss) if per_example else loss
  n = sum(per_ex(u) for u in site_tangents)
  return jax.tree.unflatten(out_tree, outs_p), jax.tree.unflatten(treedef, grads), max(n, 1)
