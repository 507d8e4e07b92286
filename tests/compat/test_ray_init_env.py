"""``dagc.patch_ray()`` and the job's runtime_env (issue 19, item 11).

The patched ``ray.init`` adds dagc's worker setup hook to the runtime_env the job would get
anyway, in every form Ray accepts, and leaves a user's own setup hook alone, saying that
dagc's cannot also run. Most tests record what reaches Ray's ``ray.init`` (no Ray started);
the last starts a Ray of its own in a child process (this session's Ray is already up).
"""

import json
import os
import subprocess
import sys
import warnings

import pytest

import dagc
from dagc import ray_compat as rc
from dagc import ray_options

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
JOB_VAR = "RAY_JOB_CONFIG_JSON_ENV_VAR"
HOOK = "worker_process_setup_hook"


@pytest.fixture
def init_calls(monkeypatch):
    """Patch with Ray's ray.init replaced by a recorder: the keywords it would get."""
    import ray

    if rc.is_patched() or rc._ORIGINAL_INIT is not None:
        pytest.fail("an earlier test left dagc.patch_ray() on")
    calls = []
    monkeypatch.setattr(ray, "init", lambda *a, **kw: calls.append(kw))
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.delenv(JOB_VAR, raising=False)
    monkeypatch.delenv("RAY_OVERRIDE_JOB_RUNTIME_ENV", raising=False)
    ray_options._WARNED.discard("hook")
    dagc.patch_ray()
    try:
        yield calls
    finally:
        dagc.unpatch_ray()  # before monkeypatch puts Ray's init back


def _init(calls, **kwargs):
    import ray

    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        ray.init(**kwargs)
    return calls[-1], [str(x.message) for x in w]


def test_runtime_env_dict_keeps_its_fields(init_calls):
    user = {"env_vars": {"A": "1"}, "working_dir": "/tmp/app", "pip": ["six"]}
    kw, warned = _init(init_calls, runtime_env=user)
    assert kw["runtime_env"] == dict(user, **{HOOK: rc._HOOK})
    assert HOOK not in user  # the caller's dict is not changed
    assert not warned


def test_runtime_env_object_keeps_its_fields_and_type(init_calls, tmp_path):
    from ray.runtime_env import RuntimeEnv

    user = RuntimeEnv(env_vars={"A": "1"}, working_dir=str(tmp_path))
    kw, _ = _init(init_calls, runtime_env=user)
    assert isinstance(kw["runtime_env"], RuntimeEnv)
    assert kw["runtime_env"]["env_vars"] == {"A": "1"}
    assert kw["runtime_env"]["working_dir"] == str(tmp_path)
    assert kw["runtime_env"][HOOK] == rc._HOOK
    assert HOOK not in user


def test_job_config_runtime_env_is_not_replaced(init_calls):
    """Ray lets ``runtime_env=`` replace ``job_config.runtime_env``: the hook must be added
    to the JobConfig's, not passed alone."""
    from ray.job_config import JobConfig

    jc = JobConfig(runtime_env={"env_vars": {"A": "1"}, "working_dir": "/tmp/app", "pip": ["six"]})
    kw, _ = _init(init_calls, job_config=jc)
    assert kw["job_config"] is jc
    assert kw["runtime_env"] == {
        "env_vars": {"A": "1"},
        "working_dir": "/tmp/app",
        "pip": ["six"],
        HOOK: rc._HOOK,
    }


def test_runtime_env_and_job_config_follow_rays_rule(init_calls):
    """Both given: Ray uses ``runtime_env=`` (it replaces the JobConfig's), so that is the
    one the hook joins; an empty ``runtime_env={}`` leaves the JobConfig's in force."""
    from ray.job_config import JobConfig

    jc = JobConfig(runtime_env={"env_vars": {"FROM_JOB": "1"}})
    kw, _ = _init(init_calls, job_config=jc, runtime_env={"env_vars": {"FROM_INIT": "1"}})
    assert kw["runtime_env"] == {"env_vars": {"FROM_INIT": "1"}, HOOK: rc._HOOK}
    kw, _ = _init(init_calls, job_config=jc, runtime_env={})
    assert kw["runtime_env"] == {"env_vars": {"FROM_JOB": "1"}, HOOK: rc._HOOK}


def test_no_runtime_env_gets_the_hook(init_calls):
    kw, _ = _init(init_calls)
    assert kw["runtime_env"] == {HOOK: rc._HOOK}


def _ray_merge(job_env, init_env):
    """What Ray does with a submitted job's runtime_env and ray.init's (None: conflict)."""
    from ray.runtime_env.runtime_env import _merge_runtime_env

    return _merge_runtime_env(job_env, init_env)


def test_submitted_job_env_is_merged_with_the_hook(init_calls, monkeypatch):
    job_env = {"env_vars": {"JOB": "1"}, "working_dir": "/tmp/app"}
    monkeypatch.setenv(JOB_VAR, json.dumps({"runtime_env": job_env}))
    kw, warned = _init(init_calls, runtime_env={"env_vars": {"INIT": "1"}})
    merged = _ray_merge(job_env, kw["runtime_env"])
    assert merged == {
        "working_dir": "/tmp/app",
        HOOK: rc._HOOK,
        "env_vars": {"JOB": "1", "INIT": "1"},
    }
    assert not warned


def test_submitted_job_with_its_own_hook_keeps_it_and_says_so(init_calls, monkeypatch):
    """Before: dagc's hook collided with the job's and ray.init failed ("Failed to merge
    the Job's runtime env"). Now the job's hook stays and the warning says why dagc's
    cannot also run and what to do."""
    job_env = {"env_vars": {"JOB": "1"}, HOOK: "myapp.setup.configure"}
    monkeypatch.setenv(JOB_VAR, json.dumps({"runtime_env": job_env}))
    kw, warned = _init(init_calls, runtime_env={"env_vars": {"INIT": "1"}})
    assert _ray_merge(job_env, kw.get("runtime_env")) == {
        HOOK: "myapp.setup.configure",
        "env_vars": {"JOB": "1", "INIT": "1"},
    }
    assert len(warned) == 1
    assert "myapp.setup.configure" in warned[0] and "cannot also run" in warned[0]
    assert f"{rc._HOOK}()" in warned[0]


def test_submitted_job_with_dagcs_hook_is_left_alone(init_calls, monkeypatch):
    job_env = {HOOK: rc._HOOK}
    monkeypatch.setenv(JOB_VAR, json.dumps({"runtime_env": job_env}))
    kw, warned = _init(init_calls)
    assert _ray_merge(job_env, kw.get("runtime_env")) == {HOOK: rc._HOOK}
    assert not warned


@pytest.mark.parametrize("form", ["dict", "job_config"])
def test_users_own_hook_is_kept_with_a_clear_warning(init_calls, form):
    from ray.job_config import JobConfig

    def my_setup():
        pass

    env = {"env_vars": {"A": "1"}, HOOK: my_setup}
    kwargs = {"runtime_env": env} if form == "dict" else {"job_config": JobConfig(runtime_env=env)}
    kw, warned = _init(init_calls, **kwargs)
    assert kw.get("runtime_env") == kwargs.get("runtime_env")  # passed on untouched
    assert env[HOOK] is my_setup
    assert len(warned) == 1 and "my_setup" in warned[0] and "cannot also run" in warned[0]


_JOB_ENV_REACHES_WORKERS = """
import os, ray, dagc
from ray.job_config import JobConfig
os.environ["DAGC_PATCH_RAY"] = "0"    # workers must be patched by the setup hook alone
dagc.patch_ray()
ray.init(address="local", num_cpus=1, include_dashboard=False,
         job_config=JobConfig(runtime_env={"env_vars": {"DAGC_TEST_MARK": "kept"}}))

@ray.remote
class Probe:
    def look(self):
        from dagc import ray_compat
        return os.environ.get("DAGC_TEST_MARK"), ray_compat.is_patched()

print("worker", *ray.get(Probe.remote().look.remote(), timeout=120))
ray.shutdown()
"""


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_job_config_env_vars_reach_a_patched_worker(tmp_path):
    """End to end, with a Ray of its own: the JobConfig's env_vars reach the actor, and
    the actor's process is patched by dagc's hook."""
    from tests.helpers import ray_address_file_kept

    prog = tmp_path / "prog.py"
    prog.write_text(_JOB_ENV_REACHES_WORKERS)
    env = dict(os.environ, RAY_ADDRESS="local", PYTHONPATH=REPO, RAY_USAGE_STATS_ENABLED="0")
    env.pop(JOB_VAR, None)
    with ray_address_file_kept():
        out = subprocess.run(
            [sys.executable, str(prog)],
            env=env,
            capture_output=True,
            text=True,
            timeout=240,
            cwd=tmp_path,
        )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("worker")]
    assert lines == ["worker kept True"], out.stdout + out.stderr[-3000:]
