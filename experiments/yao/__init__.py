"""Yao, "Studies on Forward Mode Gradient Descent": lr stability, estimate error, guided, time, memory."""
