"""``dicom-node``: run the node, run workers, check configuration, show status."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import FrameType

from models.errors import ConfigError, ManifestError
from node.checks import load_checked_settings
from node.config import DicomwebDestination, Settings, check_files, load_settings
from node.logutil import setup_logging
from node.queue import worker_command
from node.roles import Role
from node.version import software_version

log = logging.getLogger("node.cli")

WORKER_RESTART_DELAY_SECONDS = 5.0
"""How long ``run`` waits before restarting an embedded worker that exited."""


def _settings(args: argparse.Namespace, *, node_files: bool = False) -> Settings:
    """The configuration, checked against the model registry (:mod:`node.checks`); ``node_files``: also
    the files the node process reads (TLS keys and certificates, secrets: :func:`node.config.check_files`)."""
    settings = load_checked_settings(args.config)
    if node_files:
        check_files(settings)
    return settings


class _WorkerSupervisor:
    """Starts a worker process (``python -m workers``) and restarts it if it dies."""

    def __init__(self, config: Path) -> None:
        self.config = config
        self.proc: subprocess.Popen[bytes] | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="worker-supervisor", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _spawn(self) -> subprocess.Popen[bytes]:
        return subprocess.Popen(worker_command(self.config), start_new_session=False)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.proc = self._spawn()
            log.info("embedded worker started (pid %d)", self.proc.pid)
            rc = self.proc.wait()
            if self._stop.is_set():
                return
            log.error("embedded worker exited with %s; restarting in %.0f s", rc, WORKER_RESTART_DELAY_SECONDS)
            self._stop.wait(WORKER_RESTART_DELAY_SECONDS)

    def stop(self) -> None:
        self._stop.set()
        p = self.proc
        if p is not None and p.poll() is None:
            p.send_signal(signal.SIGTERM)  # Celery warm shutdown: the running job finishes or is redelivered
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self._thread.join(timeout=5)


def cmd_run(args: argparse.Namespace) -> int:
    settings = _settings(args, node_files=True)
    setup_logging(settings.logging.level, "node")
    from node.service import NodeService

    service = NodeService(settings)
    stop = threading.Event()

    def _on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("signal %d: shutting down", signum)
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    supervisor = None
    if settings.queue.embedded_workers:
        supervisor = _WorkerSupervisor(Path(args.config).resolve())
        supervisor.start()
    service.start()
    broker = "embedded file-system broker" if settings.embedded_broker else "external broker"
    log.info("dicom-node %s running (%s, storage %s)", software_version(), broker, settings.node.storage_dir)
    while not stop.wait(1.0):
        pass
    service.stop()
    if supervisor is not None:
        supervisor.stop()
    log.info("stopped")
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    """Become ``python -m workers`` (same pid, so a supervisor's signals reach Celery); the CLI
    never imports the workers package."""
    _settings(args)  # refuse a bad configuration here, with the CLI's message and exit code
    cmd = worker_command(Path(args.config), concurrency=args.concurrency, queues=args.queues)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(cmd[0], cmd)


def cmd_check_config(args: argparse.Namespace) -> int:
    settings = _settings(args, node_files=True)
    unreadable = [f"destinations[{d.name}].{key}: cannot read {path}"
                  for d in settings.destinations if isinstance(d, DicomwebDestination)
                  for key, path in (("password_file", d.password_file), ("token_file", d.token_file),
                                    ("ca_file", d.ca_file))
                  if path is not None and not os.access(path, os.R_OK)]
    if unreadable:
        print("\n".join(unreadable), file=sys.stderr)
        return 2
    print(f"configuration OK: {len(settings.rules)} rule(s), {len(settings.destinations)} destination(s), "
          f"broker: {'embedded' if settings.embedded_broker else 'external'}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    from node.catalog import Catalog
    from node.schema import JobState

    catalog = Catalog.for_storage(settings.node.storage_dir)
    print(json.dumps(catalog.counts(), indent=2, sort_keys=True))
    if args.failed:
        for job in catalog.jobs_in_state(JobState.FAILED):
            print(f"failed job #{job.id} study #{job.study_id} model={job.model} attempts={job.attempts}: "
                  f"{job.error}")
        for d, _r, study in catalog.due_deliveries(float("inf")):
            if d.attempts:
                print(f"pending delivery #{d.id} study #{study} to {d.destination} attempts={d.attempts}: "
                      f"{d.last_error}")
    return 0


def cmd_retry(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    from node.catalog import Catalog

    catalog = Catalog.for_storage(settings.node.storage_dir)
    n = catalog.retry_jobs(job_ids=args.job or None, study_id=args.study, failed=args.all_failed)
    print(f"{n} job(s) queued again; the running node sends them within a second")
    return 0 if n else 1


def cmd_models(args: argparse.Namespace) -> int:
    from models import registry

    if args.action == "evaluate":
        from testkit.evaluate import evaluate, format_table

        rows = evaluate(args.family or None, seed=args.seed)
        if args.dl:
            from testkit.dl_evaluate import evaluate_dl

            rows += evaluate_dl(seed=args.seed)
        print(format_table(rows))
        print("Accuracy on generated phantoms (held-out seeds), not on patients: see README.")
        return 0
    for name in registry.available():
        m = registry.manifest(name)
        missing = registry.missing_modules(name)
        needs = f"  (needs extra {registry.spec(name).extra}: missing {', '.join(missing)})" if missing else ""
        print(f"{m.name}  {m.version}  {m.family:<14} {','.join(m.modalities):<6} {m.description}{needs}")
    return 0


def _when(t: float | None) -> str:
    return "-" if t is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def cmd_token(args: argparse.Namespace) -> int:
    """API tokens of the HTTP service: the token is printed once by ``create`` (alone on stdout) and
    only its hash is stored; ``list`` shows names, roles and dates, never a token."""
    settings = load_settings(args.config)
    from node.catalog import Catalog
    from node.tokens import create_token, list_tokens, revoke_token

    catalog = Catalog.for_storage(settings.node.storage_dir)
    if args.action == "create":
        token = create_token(catalog, args.name, args.role, time.time())
        print(f"token {args.name!r} (role {args.role}) created; it is shown once, keep it now:", file=sys.stderr)
        print(token)
        return 0
    if args.action == "revoke":
        if not revoke_token(catalog, args.name, time.time()):
            print(f"dicom-node: no active token named {args.name!r}", file=sys.stderr)
            return 1
        print(f"token {args.name!r} revoked")
        return 0
    rows = list_tokens(catalog)
    print(f"{'name':<24} {'role':<9} {'created':<20} {'last used':<20} revoked")
    for t in rows:
        print(f"{t.name:<24} {t.role.value:<9} {_when(t.created_at):<20} {_when(t.last_used_at):<20} "
              f"{_when(t.revoked_at)}")
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    """The audit trail (``<storage_dir>/audit/audit.log`` and its rotated files), oldest first."""
    settings = load_settings(args.config)
    from node.audit import EVENT_NAMES, audit_dir
    from node.audit_read import format_table, parse_time, read_records

    try:
        since = parse_time(args.since) if args.since else None
        until = parse_time(args.until) if args.until else None
    except ValueError as exc:
        print(f"dicom-node: --since/--until: {exc} (ISO 8601, e.g. 2026-12-01T00:00)", file=sys.stderr)
        return 2
    records = read_records(audit_dir(settings), since=since, until=until, event=args.event)
    rows = list(records)
    n = len(rows)
    if rows or not args.json:
        print("\n".join(rec.line() for rec in rows) if args.json else format_table(rows))
    if not n and args.event and args.event.lower() not in EVENT_NAMES.values() and not args.event.isdigit():
        print(f"no record of event {args.event!r}; events: {', '.join(sorted(EVENT_NAMES.values()))}",
              file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dicom-node",
        description="DICOM AI analysis node: receives studies (C-STORE), runs AI models on them and "
        "sends the results (DICOM SEG + SR) back to the PACS.",
        epilog="Start with `dicom-node check-config --config deploy/config.example.yaml`, then "
        "`dicom-node run --config ...`. Logs never contain patient data above DEBUG.",
    )
    p.add_argument("--version", action="version", version=f"dicom-node {software_version()}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_config(sp: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sp.add_argument("--config", "-c", required=True, type=Path, help="YAML configuration file")
        return sp

    r = with_config(sub.add_parser("run", help="run the whole node (receiver, router, sender, workers)"))
    r.set_defaults(func=cmd_run)
    w = with_config(sub.add_parser("worker", help="run a Celery worker (for queue.broker_url = redis://...)"))
    w.add_argument("--concurrency", type=int, default=0, help="worker processes (default: from config)")
    w.add_argument("--queues", default="",
                   help="comma-separated queues to consume (default: cpu and every queue named under models:); "
                   "a GPU machine runs `--queues gpu --concurrency 1` per GPU")
    w.set_defaults(func=cmd_worker)
    c = with_config(sub.add_parser("check-config", help="validate the configuration and exit"))
    c.set_defaults(func=cmd_check_config)
    s = with_config(sub.add_parser("status", help="print study/job/delivery counts from the catalog"))
    s.add_argument("--failed", action="store_true", help="also list failed jobs and retrying deliveries")
    s.set_defaults(func=cmd_status)
    rt = with_config(sub.add_parser("retry", help="queue failed (or skipped) jobs again"))
    which = rt.add_mutually_exclusive_group(required=True)
    which.add_argument("--job", type=int, action="append", help="job id (repeatable)")
    which.add_argument("--study", type=int, help="every failed/skipped job of this study (catalog id)")
    which.add_argument("--all-failed", action="store_true", help="every failed/skipped job")
    rt.set_defaults(func=cmd_retry)
    m = sub.add_parser("models", help="list the models this node knows, or evaluate them on phantoms")
    m.add_argument("action", nargs="?", choices=["list", "evaluate"], default="list")
    m.add_argument("--family", action="append", help="evaluate only this family (repeatable)")
    m.add_argument("--seed", type=int, default=0, help="first phantom seed of the held-out set")
    m.add_argument("--dl", action="store_true", help="also evaluate the deep-learning demo models (needs torch)")
    m.set_defaults(func=cmd_models)
    au = with_config(sub.add_parser("audit", help="list audit records (rotated files included), oldest first"))
    au.add_argument("--since", help="from this time on (ISO 8601; local time without a zone), e.g. 2026-12-01T00:00")
    au.add_argument("--until", help="before this time (ISO 8601)")
    au.add_argument("--event", metavar="NAME",
                    help="only this event: application-activity, user-authentication, security-alert, "
                    "instances-transferred, instances-accessed, query, begin-transferring (or an EventID or "
                    "EventTypeCode code or name, e.g. 110120, 'Application Stop', study-rerun)")
    au.add_argument("--json", action="store_true", help="the records as stored: one JSON object per line")
    au.set_defaults(func=cmd_audit)
    tk = sub.add_parser("token", help="API tokens of the HTTP service: create (printed once), list, revoke")
    tks = tk.add_subparsers(dest="action", required=True, metavar="ACTION")
    tc = with_config(tks.add_parser("create", help="create a token and print it (only its hash is stored)"))
    tc.add_argument("--name", required=True, help="who or what uses it (1-64 letters, digits, _ . @ -)")
    tc.add_argument("--role", required=True, choices=[r.value for r in Role],
                    help="viewer (QIDO/WADO, API reads, metrics, docs), sender (STOW-RS), "
                    "operator (viewer + retry/rerun/pause), admin (everything)")
    tl = with_config(tks.add_parser("list", help="names, roles, dates (never the tokens)"))
    tr = with_config(tks.add_parser("revoke", help="revoke a token: it is refused (401) from the next request"))
    tr.add_argument("name", help="the token's name")
    for sp in (tc, tl, tr):
        sp.set_defaults(func=cmd_token)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (ConfigError, ManifestError) as exc:  # unknown models, options, missing extras, bad manifests
        print(f"dicom-node: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
