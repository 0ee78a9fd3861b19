"""Joining a Ray cluster and checking what it can run, before any data is read: ``connect``
refuses a job server's http address, an address nothing answers on, actors no alive node or
autoscaling node type can host, more ``min_actors`` than fit at once, and a ``--device`` the
actors will not see; ``stage_gpus`` gives each model stage its GPUs. An error raised on the
cluster reaches the user as one line (``cluster_error``).
"""

from __future__ import annotations

import logging
import math
import os
import re
import signal
import socket
import threading
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from ezmia import errors
from ezmia.backends import device_count, parse_device
from ezmia.config import AuditConfig, RayOptions
from ezmia.data import storage
from ezmia.engines.scoring import model_stages
from ezmia.errors import EzmiaError, InputError, one_line
from ezmia.plan.planner import job_server_address

log = logging.getLogger(__name__)


PROBE_TIMEOUT_S = 10.0
"""How long a cluster address may take to accept a TCP connection (``ray.init`` itself
retries an address nothing answers on for minutes)."""

RESOURCE_STEP = 0.0001
"""The finest fraction of a CPU or GPU Ray grants."""

_HOST_PORT = re.compile(r"^(?:ray://)?\[?(?P<host>[^\]/]+?)\]?:(?P<port>\d+)/?$")


def connect(config: AuditConfig) -> dict[str, float]:
    """Join the Ray cluster (``--ray-address``, else ``RAY_ADDRESS``, else a new local one)
    and refuse an audit its nodes cannot run, before any model or data is read. Returns
    ``stage_gpus`` on the cluster joined (its alive nodes and node types)."""
    import ray

    address = config.ray.address or os.environ.get("RAY_ADDRESS") or None
    if config.ray.gpus_per_actor is not None or not (address or ray.is_initialized()):
        # known before joining: asked for, or a new local instance has this machine's GPUs
        for gpus in set(stage_gpus(config, device_count("cuda") > 0).values()):
            check_request(config.ray, config.device, gpus)
    if not ray.is_initialized():
        flag = "a new local Ray instance (no --ray-address or RAY_ADDRESS)"
        if address:
            flag = f"--ray-address {address}" if config.ray.address else f"RAY_ADDRESS={address}"
            if job_server_address(address):
                raise InputError(
                    f"{flag}: this is a Ray job server's address (the dashboard's, which "
                    "`ray job submit` takes), not a cluster to join: pass --ray-address "
                    "HOST:6379 (the head's GCS address), submit jobs/audit.py with `ray job "
                    "submit`, or use --engine local"
                )
            _probe(address, flag)
        cwd, sigterm = os.getcwd(), signal.getsignal(signal.SIGTERM)
        try:
            ray.init(address=address, log_to_driver=True)
            _keep_sigterm_handler(sigterm)
            _reenter(cwd)
        except Exception as err:  # Ray raises ConnectionError, ValueError, RuntimeError...
            reason = one_line(err, 300)
            raise InputError(
                f"{flag}: cannot join the Ray cluster ({reason}); check the address "
                "and that the cluster is up"
            ) from err
    quiet_ray_data()
    nodes, types = ray.nodes(), node_types()
    joined = stage_gpus(config, any(gpus for _, gpus in _alive_shapes(nodes) + types))
    for gpus in sorted(set(joined.values())):
        if config.ray.gpus_per_actor is None:
            check_request(config.ray, config.device, gpus)
        check_resources(config.ray, nodes, types, gpus)
    return joined


def quiet_ray_data() -> None:
    """Ray Data's progress bars and per-operator INFO lines only with ``-v`` (ezmia logs at
    INFO): otherwise ezmia's own progress lines are what a job's log shows. Without ``-v``
    the stack traces Ray Data prints for a failed run (pages of its own frames) go to its log
    file only: ezmia reports the error in one line that points there."""
    import ray.data

    verbose = logging.getLogger("ezmia").isEnabledFor(logging.INFO)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = verbose
    context.print_on_execution_start = verbose
    context.enable_auto_log_stats = False
    logging.getLogger("ray.data").setLevel(logging.INFO if verbose else logging.WARNING)
    traces = logging.getLogger("ray.data.exceptions")
    (traces.removeFilter if verbose else traces.addFilter)(_log_file_only)  # added once at most


def _log_file_only(record: logging.LogRecord) -> bool:
    """Marks a record ``hide``: Ray Data's console handler drops it (its
    ``HiddenRecordFilter``), its log file keeps it."""
    record.hide = True
    return True


def node_types() -> list[tuple[float, float]]:
    """``(CPU, GPU)`` of each node type an autoscaler may start (its cluster config in the GCS,
    ``ray._private.state``, as Ray Data's own autoscaler reads it), including types scaled to
    zero; empty on a cluster without an autoscaler or where Ray's private API moved."""
    try:
        import ray._private.state

        groups = ray._private.state.state.get_cluster_config().node_group_configs
    except Exception:  # no cluster config (no autoscaler), or Ray's private API moved
        return []
    return [
        (float(g.resources.get("CPU", 0.0)), float(g.resources.get("GPU", 0.0)))
        for g in groups
        if g.max_count != 0
    ]


def _alive_shapes(nodes: list[dict]) -> list[tuple[float, float]]:
    """``(CPU, GPU)`` of each alive node of ``ray.nodes()``."""
    resources = [n["Resources"] for n in nodes if n.get("Alive")]
    return [(r.get("CPU", 0.0), r.get("GPU", 0.0)) for r in resources]


def stage_gpus(config: AuditConfig, cluster_has_gpus: bool) -> dict[str, float]:
    """GPUs per actor of each model stage: ``--ray-gpus-per-actor`` when given, else the
    stage's tensor-parallel size on a cluster with GPUs (alive or an autoscaling node type),
    else 0."""
    stages = model_stages(_is_adapter_config(config))
    if config.ray.gpus_per_actor is not None:
        return {role: config.ray.gpus_per_actor for role in stages}
    if not cluster_has_gpus:
        return {role: 0.0 for role in stages}
    return {role: float(config.vllm.stage_tensor_parallel_size(role)) for role in stages}


def _is_adapter_config(config: AuditConfig) -> bool:
    """Whether the target is an adapter, from its ``adapter_config.json`` (a small file)."""
    if storage.is_s3(config.target):
        return storage.exists(storage.join(config.target.rstrip("/"), "adapter_config.json"))
    return (Path(config.target).expanduser() / "adapter_config.json").exists()


def _noop() -> None:
    """A task that needs only the job's runtime environment."""


def _keep_sigterm_handler(handler) -> None:
    """Put back the SIGTERM handler ``ray.init`` replaces with a bare ``sys.exit``: a stopped
    job (``ray job stop``, a killed pod) then ends as on Ctrl-C, its output removed and exit
    code 130, as the command line's handler does."""
    if handler is not None and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)


def _reenter(cwd: str) -> None:
    """Keep this driver in a working folder that exists. In a Ray job whose runtime env has a
    ``working_dir``, Ray 2.60 extracts that folder afresh while installing the job's
    environment on this node (after ``ray.init`` returns), deleting the copy this process runs
    in: ``os.getcwd()`` (which transformers calls on import) and relative paths then fail.
    Wait for the installation (a task pinned to this node needs it), then enter the fresh
    copy."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    context = ray.get_runtime_context()
    if not (context.runtime_env or {}).get("working_dir"):
        return
    here = NodeAffinitySchedulingStrategy(context.get_node_id(), soft=False)
    ray.get(ray.remote(_noop).options(num_cpus=0, scheduling_strategy=here).remote())
    os.chdir(cwd)  # the same folder where it was not extracted afresh


def _probe(address: str, flag: str) -> None:
    """Refuse at once a ``host:port`` address (or the one ``auto`` finds: the last cluster
    started on this machine) that accepts no TCP connection."""
    if address.strip() == "auto":
        try:
            from ray._private.services import canonicalize_bootstrap_address

            address = canonicalize_bootstrap_address("auto") or ""
        except Exception:  # none found, or Ray's private API moved: ray.init says why
            return
    match = _HOST_PORT.match(address.strip())
    if match is None:
        return  # "local" or a form Ray resolves itself
    try:
        socket.create_connection((match["host"], int(match["port"])), PROBE_TIMEOUT_S).close()
    except OSError as err:
        raise InputError(
            f"{flag}: no Ray cluster answers there ({err.strerror or err}); start the "
            "cluster or fix the address (the head's GCS address, HOST:6379)"
        ) from err


def check_request(options: RayOptions, device: str, gpus: float) -> None:
    """Refuse GPU requests (``gpus`` per actor) Ray cannot grant and a ``--device`` the model
    stages' actors will not see: Ray hides GPUs from actors that ask for none and numbers an
    actor's GPUs from ``cuda:0`` (no cluster needed)."""
    for flag, value in (("cpus", options.cpus_per_actor), ("gpus", gpus)):
        if 0 < value < RESOURCE_STEP:
            raise InputError(
                f"--ray-{flag}-per-actor {value:g}: Ray counts resources in steps of "
                f"{RESOURCE_STEP:g}; ask for {RESOURCE_STEP:g} or more"
            )
    if gpus > 1 and not float(gpus).is_integer():
        raise InputError(
            f"--ray-gpus-per-actor {gpus:g}: Ray grants more than one GPU only in whole GPUs; "
            "use a whole number, or a fraction below 1 to share a GPU"
        )
    if device in ("auto", "cpu"):
        return
    parsed = parse_device(device)
    if parsed.type != "cuda":
        raise InputError(
            f"--device {device}: Ray gives scoring actors CPUs and CUDA GPUs only; use --device "
            "auto, cpu or cuda (with --ray-gpus-per-actor), or --engine local"
        )
    if not gpus:
        raise InputError(
            f"--device {device}: the scoring actors ask for no GPU (--ray-gpus-per-actor 0), so "
            "Ray hides CUDA from them; pass --ray-gpus-per-actor 1 (or a fraction to share a "
            "GPU), or --device auto"
        )
    visible = max(1, math.floor(gpus))
    if parsed.index is not None and parsed.index >= visible:
        raise InputError(
            f"--device {device}: each scoring actor sees {visible} GPU"
            f"{'s' if visible > 1 else ''} (--ray-gpus-per-actor {gpus:g}), numbered from "
            "cuda:0 on its node; use --device cuda"
        )


def check_resources(
    options: RayOptions, nodes: list[dict], types: Sequence[tuple[float, float]], gpus: float
) -> None:
    """Refuse model-stage actors (``gpus`` each) that no alive node and no autoscaling node
    type (``types``: ``(CPU, GPU)``, ``node_types()``) can host, and more ``min_actors`` than
    the alive nodes host at once when no node type could add more. ``nodes`` is
    ``ray.nodes()``."""
    cpus = options.cpus_per_actor
    shapes = _alive_shapes(nodes)
    if any(actors_per_node(shape, cpus, gpus) for shape in types):
        return  # the autoscaler can start a node that hosts it (and more of them)
    counted = _describe_nodes(shapes, types)
    fits = [actors_per_node(shape, cpus, gpus) for shape in shapes]
    if not any(fits):
        most_cpus = max((c for c, _ in shapes), default=0.0)
        most_gpus = max((g for _, g in shapes), default=0.0)
        if gpus and not most_gpus:
            raise InputError(
                f"--ray-gpus-per-actor {gpus:g}: no node of the Ray cluster has a GPU ({counted}); "
                "use --ray-gpus-per-actor 0 to score on CPUs, or add nodes with GPUs"
            )
        if most_gpus < gpus:
            raise InputError(
                f"--ray-gpus-per-actor {gpus:g}: no node of the Ray cluster has that many GPUs, "
                f"the most is {most_gpus:g} ({counted}); use --ray-gpus-per-actor {most_gpus:g} "
                "or less"
            )
        if most_cpus < cpus:
            raise InputError(
                f"--ray-cpus-per-actor {cpus:g}: no node of the Ray cluster has that many CPUs "
                f"({counted}); use --ray-cpus-per-actor {most_cpus:g} or less"
            )
        raise InputError(
            f"--ray-cpus-per-actor {cpus:g} with --ray-gpus-per-actor {gpus:g}: no node of the "
            f"Ray cluster has both ({counted}); ask for fewer CPUs per actor or add such nodes"
        )
    if sum(fits) < options.min_actors:
        raise InputError(
            f"--ray-min-actors {options.min_actors}: the Ray cluster hosts at most {sum(fits)} "
            f"scoring actors at once ({cpus:g} CPU and {gpus:g} GPU each; {counted}); use "
            f"--ray-min-actors {sum(fits)} or less, or smaller actors"
        )


def actors_per_node(shape: tuple[float, float], cpus: float, gpus: float) -> int:
    """How many actors (or audits) of ``cpus`` and ``gpus`` a node (or cluster) of ``(CPU, GPU)``
    hosts at once."""
    counts = [math.floor(shape[0] / cpus + 1e-9)]
    if gpus:
        counts.append(math.floor(shape[1] / gpus + 1e-9))
    return min(counts)


def _describe_nodes(shapes: list[tuple[float, float]], types: Sequence[tuple[float, float]]) -> str:
    """``"alive nodes now: 2 x (2 CPU, 0 GPU)"``, plus the autoscaling node types (or that the
    check cannot see any)."""
    groups = Counter(shapes)
    listed = ", ".join(f"{n} x ({c:g} CPU, {g:g} GPU)" for (c, g), n in sorted(groups.items()))
    alive = f"alive nodes now: {listed or 'none'}"
    if not types:
        return f"{alive}; nodes an autoscaler has not started are not counted"
    kinds = ", ".join(f"({c:g} CPU, {g:g} GPU)" for c, g in sorted(set(types)))
    return f"{alive}; autoscaling node types: {kinds}"


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_RAISED = re.compile(r"^(?P<name>[A-Za-z_][\w.]*): (?P<message>.*)$")


def cluster_error(err: Exception) -> EzmiaError:
    """One line for an error raised on the cluster (Ray wraps it in pages of traceback): an
    ezmia error raised by a task or actor keeps its class and message; any other error is
    named by the last error line of its traceback that is not Ray's own wrapper, with where to
    look."""
    lines = _ANSI.sub("", str(err)).splitlines()
    raised = [(i, m) for i, line in enumerate(lines) if (m := _RAISED.match(line))]
    for i, match in reversed(raised):
        module, _, name = match["name"].rpartition(".")
        kind = getattr(errors, name, None) if module == "ezmia.errors" else None
        if isinstance(kind, type) and issubclass(kind, EzmiaError):
            rest = lines[i + 1 :]
            rest = rest[: rest.index("")] if "" in rest else rest  # a chained error follows
            return kind(one_line(" ".join([match["message"], *rest])))
    own = [m for _, m in raised if not m["name"].startswith("ray.")]  # not Ray's wrappers
    if raised:
        match = (own or [m for _, m in raised])[-1]
        what = f"{match['name'].rpartition('.')[2]}: {match['message'].strip()}"
    else:
        first = next((line.strip() for line in lines if line.strip()), "")
        what = f"{type(err).__name__}: {first}"
    return EzmiaError(
        f"the Ray audit failed on the cluster ({what[:400]}); see the scoring actors' logs (Ray "
        "dashboard, or `ray logs`), fix the cause and rerun"
    )
