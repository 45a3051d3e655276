"""Notifications (``notifications:``): webhooks (signed JSON POST) and e-mail (SMTP) when a job fails
for good, a delivery is late, a destination is down (and back), the disk is above the high watermark
(and back below the low one), a worker is lost, and optionally when a model has results.

Events are found in the catalog (:mod:`node.notify.detect`), recorded once with one outbox row per
target (:mod:`node.notify.outbox`), and sent by their own loop with backoff (:mod:`node.notify.send`).
"""

from node.notify.notifier import Notifier, send_test

__all__ = ["Notifier", "send_test"]
