"""Ray start-up for the commands: an embedded Ray or a cluster that answers, and Ray's own logs kept quiet."""

from __future__ import annotations

import logging
import os
import re
import socket
import sys
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from raycap.config import verbose

T = TypeVar("T")

# Set in the environment unless already there, when not verbose (see quiet_ray).
QUIET_RAY_ENV = {
    # Ray Data logs to the console at ERROR and to its session log file at every level.
    "RAY_DATA_LOGGING_CONFIG": str(Path(__file__).with_name("ray_data_logging.yaml")),
    # Workers of an embedded Ray do not print deprecation notices of Ray's and torch's internals.
    "PYTHONWARNINGS": "ignore::DeprecationWarning",
    # Lines of workers that no log level reaches, dropped by the driver (Ray's log deduplicator reads this
    # when ray is first imported): Ray Train's per-report line (its logger is named by file path, outside
    # ray.train), the raylet's worker start-up notice, the core worker's note on actor constructor arguments.
    "RAY_DEDUP_LOGS_SKIP_REGEX": r"Reporting training result \d+: TrainingReport"
    r"|PYTHON worker processes have been started on node"
    r"|has constructor arguments in the object store and max_restarts > 0",
}


_embedded = False  # whether this process started the Ray it uses (see exit_now)

# Lines this process's own Ray core worker writes to stderr (C++ logging, which no Python level reaches), dropped
# when not verbose: Ray Data ships every actor's context and function as object-store arguments (so each Ray Data
# actor with restarts draws this), and the driver owns those objects for the whole job, so a restart finds them.
DRIVER_SKIP = re.compile(rb"has constructor arguments in the object store and max_restarts > 0")
_stderr_filter: dict[str, Any] = {}  # the filter's thread and fds while this process's stderr goes through it
_filter_wanted = False  # set by the `raycap` command (see filter_driver_stderr)


def filter_driver_stderr() -> None:
    """Ask init_ray to put this process's stderr (fd 2) through a filter of DRIVER_SKIP lines once Ray is up (so
    Ray's own processes keep the real stderr). Only for a command's own process: exit_now drains it."""
    global _filter_wanted
    _filter_wanted = True


def _start_stderr_filter() -> None:
    read_fd, write_fd = os.pipe()
    real = os.dup(2)
    os.dup2(write_fd, 2)
    os.close(write_fd)

    def forward() -> None:
        with os.fdopen(read_fd, "rb", buffering=0) as pipe:
            for line in iter(pipe.readline, b""):
                if not DRIVER_SKIP.search(line):
                    os.write(real, line)

    thread = threading.Thread(target=forward, name="raycap-stderr", daemon=True)
    thread.start()
    _stderr_filter.update(thread=thread, real=real)


def _stop_stderr_filter() -> None:
    """Give fd 2 back to the real stderr and forward what is still in the pipe."""
    if not _stderr_filter:
        return
    os.dup2(_stderr_filter["real"], 2)  # the pipe's last writer is gone: the thread reads to its end
    _stderr_filter.pop("thread").join(timeout=5)


def quiet_ray() -> None:
    """Keep Ray's own log lines out of the terminal unless --verbose or RAYCAP_VERBOSE=1; errors still show.

    The one place raycap sets Ray's log levels: `main` calls it before any command imports Ray, and init_ray
    before `ray.init`. Ray Data's and Ray Train's session log files keep every level. The environment variables
    reach the processes of an embedded Ray; on a cluster they reach the driver (Ray Train's level is in its
    RunConfig, which reaches every worker).
    """
    if verbose():
        return
    for name, value in QUIET_RAY_ENV.items():
        os.environ.setdefault(name, value)
    warnings.filterwarnings("ignore", module=r"ray(\.|$)")  # Ray's warnings about its own internals
    # Ray 2.60 takes an actor pool's max_task_retries only as ray_remote_args (2.64 names them; pipeline.py).
    warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
    for name in ("ray", "ray.data", "ray.train"):
        for handler in logging.getLogger(name).handlers:
            if not isinstance(handler, logging.FileHandler) and type(handler).__name__ != "SessionFileHandler":
                # Ray Data's ERROR records repeat the exception that reaches the driver (ray_data_logging.yaml).
                handler.setLevel(logging.CRITICAL if name == "ray.data" else logging.ERROR)


def plain_worker_prefixes() -> None:
    """Ray colours the `(RayTrainWorker pid=…)` prefix of every worker line it prints; in a log file or a pipe
    those are escape codes, so they are turned off unless the output is a terminal (or the user chose)."""
    if not sys.stdout.isatty():
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")


def init_ray(address: str | None, dashboard: bool = True) -> None:
    """Connect to `address` (or RAY_ADDRESS, as inside `ray job submit`), or start an embedded local Ray (with
    Ray's dashboard if `dashboard`: Ray Train needs it, the image pipelines do not).

    Ray's own rule for no address is to join the last cluster started on this machine, and to retry a
    dead one for minutes; raycap starts its own instead. A given address that does not answer is one
    line within seconds.
    """
    import ray

    # In the environment, not a runtime_env: the processes of an embedded Ray inherit it, and a job with a
    # runtime_env gets no prestarted worker (each of its workers starts on demand, through the runtime env agent).
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    plain_worker_prefixes()
    quiet_ray()
    if ray.is_initialized():
        return
    address, flag = _given_address(address)
    if address is None:
        global _embedded
        ray.init(
            address="local",
            include_dashboard=dashboard,
            log_to_driver=True,
            logging_level=logging.ERROR,  # no start-up chatter
        )
        _embedded = True
    else:
        _check_reachable(address, flag)
        ray.init(address=address, log_to_driver=True)
    if _filter_wanted and not verbose() and not _stderr_filter:
        _start_stderr_filter()
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = sys.stderr.isatty()


def _given_address(address: str | None) -> tuple[str | None, str]:
    """The cluster address to join (--address, else RAY_ADDRESS as inside `ray job submit`) and its source."""
    if address is None and os.environ.get("RAY_ADDRESS"):
        return os.environ["RAY_ADDRESS"], "RAY_ADDRESS"
    return address, "--address"


def init_ray_while(address: str | None, work: Callable[[], T], dashboard: bool = True) -> T:
    """init_ray(address) while `work` (importing torch, resolving weights) runs in a thread, so that the two wait
    for each other only at the end. A dead address is one line before the thread starts; then Ray's error
    comes first, then work's."""
    import ray
    import ray.data  # noqa: F401 - imported before the thread starts, so that the two never import them at once

    given, flag = _given_address(address)
    if given is not None and not ray.is_initialized():
        _check_reachable(given, flag)
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = work()
        except BaseException as e:  # noqa: BLE001 - handed to the main thread, which raises it
            outcome["error"] = e

    thread = threading.Thread(target=target, name="raycap-prepare", daemon=True)
    thread.start()
    init_ray(address, dashboard=dashboard)
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def _check_reachable(address: str, flag: str, timeout: float = 5.0) -> None:
    """A ValueError line unless something listens at the address's GCS (or Ray client) port."""
    target = address
    if address == "auto":
        from ray._private.services import find_bootstrap_address

        target = find_bootstrap_address(None)
        if target is None:
            raise ValueError(f"{flag} auto: no Ray cluster was started on this machine (`ray start --head`)")
    host, _, port = target.split("://", 1)[-1].rstrip("/").rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"{flag} {address!r}: expected HOST:PORT, ray://HOST:PORT or auto")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()  # [::1]:6379 too
    except OSError as e:
        reason = e.strerror or type(e).__name__
        raise ValueError(
            f"{flag} {address}: no Ray cluster answers at {host}:{port} ({reason}); start one with "
            "`ray start --head`, or leave --address out for an embedded Ray"
        ) from None


def exit_now(code: int) -> None:
    """End the process with `code`. When it started an embedded Ray, without waiting on teardown (seconds): every
    output is written and committed before a command returns, and Ray's processes share this one's fate (they
    die with it), so the teardown protects no data."""
    sys.stdout.flush()
    sys.stderr.flush()
    _stop_stderr_filter()
    if _embedded:
        os._exit(code)
    sys.exit(code)
