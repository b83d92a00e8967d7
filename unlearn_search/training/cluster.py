"""Joining or starting the Ray cluster that trials run on."""

from __future__ import annotations

WORKER_ENV = {
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONUNBUFFERED": "1",
    # Ray Train's controller moves a trial's worker group through its start-up states and sees
    # the training end only on its health check (every 2 s by default): each check is one
    # cheap call per worker, and a shorter interval takes seconds off every trial's start and end.
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
    # Ray Train's print patch sends each print of a worker to the root logger, also from inside a
    # library's capture of stdout: datasets fingerprints a table with dill, which disassembles a
    # function into a captured stdout to read its globals, and the bytecode reached the terminal.
    # Off, a worker's prints go to its stdout as in any Ray process, and Ray forwards them.
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    # The preemption watcher is one more actor per trial that watches for node drains and logs
    # them for `ray.train.get_preemption_info`, which trials do not read (a worker lost with its
    # node restarts from the last checkpoint, as any lost worker does: `max_failures`); Ray's core
    # logs an error line as it starts.
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
}
# Every process of the job, Ray's own actors too (Ray Train's controller and placement-group
# cleaner), silences the known third-party lines as it starts.
SETUP_HOOK = "unlearn_search.quiet.silence_known_warnings"


def init_ray(
    address: str | None = None,
    num_cpus: int | None = None,
    dashboard: bool = False,
    dashboard_host: str = "127.0.0.1",
    dashboard_port: int | None = None,
):
    """Join ``address`` (``auto`` or ``ray://...``) or start a local instance.

    A local instance listens on 127.0.0.1 only; its dashboard too unless asked otherwise.
    Returns the ``ray.init`` context (``dashboard_url`` may be None when it is off).
    """
    import ray

    if ray.is_initialized():
        return ray.get_runtime_context()
    # No DS_ACCELERATOR here: the driver's devices say nothing of the workers' (a CPU head node
    # submits to GPU workers). Each trial worker decides from its own (trial.accelerator_environment).
    # A new dict each time: ray.init writes the hook into the runtime environment's env_vars.
    runtime_env = {"env_vars": dict(WORKER_ENV), "worker_process_setup_hook": SETUP_HOOK}
    kwargs = {"runtime_env": runtime_env, "log_to_driver": True}
    if address:
        return ray.init(address=address, **kwargs)
    kwargs.update(
        num_cpus=num_cpus, include_dashboard=dashboard, dashboard_host=dashboard_host, _node_ip_address="127.0.0.1"
    )
    if dashboard_port:
        kwargs["dashboard_port"] = dashboard_port
    return ray.init(**kwargs)
