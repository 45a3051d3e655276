"""The storage lifecycle: disk usage by area (:mod:`.usage`), which studies may go and why
(:mod:`.eligibility`, a pure core; :mod:`.facts`, its catalog shell), the purge plan and its
crash-safe execution (:mod:`.purge`), coordination with the receiver and the CLI (:mod:`.guard`),
and the node's watermark loop and receive gate (:mod:`.loop`).
"""
