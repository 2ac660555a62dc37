"""How a script finds its ranks (dalle_ds/train/distributed.py): a plain ``python script.py`` is a world of one, but
a process started by MPI or Slurm without RANK (DeepSpeed's openmpi / mvapich / slurm runners) is left to DeepSpeed's
MPI discovery instead of being made rank 0 of a world of one."""
import os

import pytest

from dalle_ds.train import distributed
from dalle_ds.train.distributed import multi_process_launch, single_process_env

RANK_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.mark.parametrize("env", [
    {"OMPI_COMM_WORLD_SIZE": "8", "OMPI_COMM_WORLD_RANK": "3"},  # --launcher openmpi (mpirun)
    {"PMI_SIZE": "4", "PMI_RANK": "1"},  # MPICH / Intel MPI (Hydra)
    {"MV2_COMM_WORLD_SIZE": "2", "MV2_COMM_WORLD_RANK": "0"},  # --launcher mvapich
    {"SLURM_PROCID": "5", "SLURM_NTASKS": "16"},  # --launcher slurm (srun)
    {"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_STEP_NUM_TASKS": "8"},  # the step's count wins
])
def test_mpi_and_slurm_jobs_are_left_to_deepspeeds_discovery(env):
    assert multi_process_launch(env) is not None
    assert single_process_env(env) is None


@pytest.mark.parametrize("env", [
    {},  # python script.py
    {"OMPI_COMM_WORLD_SIZE": "1"},  # mpirun -n 1
    {"SLURM_NTASKS": "4", "SLURM_JOB_ID": "7"},  # inside an allocation, not a task of a step
    {"SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_STEP_NUM_TASKS": "1"},  # a one-task step of a larger job
    {"SLURM_PROCID": "0", "SLURM_NTASKS": "1"},
])
def test_a_plain_process_is_a_world_of_one(env):
    assert multi_process_launch(env) is None
    got = single_process_env(env)
    assert {k: got[k] for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR")} == {
        "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
    assert int(got["MASTER_PORT"]) > 0


def test_a_launcher_that_set_the_rank_is_kept():
    env = {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500",
           "OMPI_COMM_WORLD_SIZE": "2"}
    assert single_process_env(env) is None
    # RANK alone set (others missing): nothing is filled, DeepSpeed decides as before
    assert single_process_env({"RANK": "0"}) is None
    # a world of one keeps a port it was given
    assert single_process_env({"MASTER_PORT": "1234"}) == {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
                                                           "MASTER_ADDR": "127.0.0.1"}


class _Stop(Exception):
    pass


def _init_with(monkeypatch, env: dict, raise_from_deepspeed: BaseException):
    """Run init_distributed with ``env`` as the environment and a stub deepspeed.init_distributed that records the
    environment it is called with, then raises ``raise_from_deepspeed``."""
    import deepspeed

    for k in list(os.environ):
        if k in RANK_VARIABLES or k.startswith(("OMPI_", "PMI_", "MV2_", "SLURM_")):
            monkeypatch.delenv(k)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    seen = {}

    def fake_init_distributed(**kwargs):
        seen.update(os.environ)
        raise raise_from_deepspeed

    monkeypatch.setattr(deepspeed, "init_distributed", fake_init_distributed)
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    return seen


def test_init_distributed_under_mpirun_does_not_fill_a_world_of_one(monkeypatch):
    seen = _init_with(monkeypatch, {"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "1"}, _Stop())
    with pytest.raises(_Stop):
        distributed.init_distributed()
    assert not set(RANK_VARIABLES) & set(seen), "RANK etc. were filled: DeepSpeed's MPI discovery would be skipped"


def test_init_distributed_alone_fills_a_world_of_one(monkeypatch):
    seen = _init_with(monkeypatch, {}, _Stop())
    with pytest.raises(_Stop):
        distributed.init_distributed()
    assert (seen["RANK"], seen["LOCAL_RANK"], seen["WORLD_SIZE"]) == ("0", "0", "1")


def test_missing_mpi4py_names_the_launch_and_the_fix(monkeypatch):
    _init_with(monkeypatch, {"SLURM_PROCID": "1", "SLURM_NTASKS": "4"},
               ModuleNotFoundError("No module named 'mpi4py'", name="mpi4py"))
    with pytest.raises(RuntimeError, match=r"SLURM_NTASKS=4(.|\n)*mpi4py(.|\n)*deepspeed launcher"):
        distributed.init_distributed()


def _disagree(rank, world, values):
    import pytest as _pytest

    from dalle_ds.train.distributed import check_same_on_every_rank

    check_same_on_every_rank("nothing", 7)  # the same everywhere: no error
    with _pytest.raises(RuntimeError) as e:
        check_same_on_every_rank("the training set's size", values[rank], "read the same data")
    return str(e.value)


@pytest.mark.distributed
def test_ranks_that_disagree_all_raise_the_same_error():
    """What each rank works out alone but all must share (the dataset's length, the checkpoint tag): a difference
    raises the same error on every rank (run_local_ranks fails if any rank does not raise), naming the values and
    the ranks that hold them."""
    from dalle_ds.dist.local_ranks import run_local_ranks

    msg = run_local_ranks(_disagree, 3, [100, 99, 100], timeout=120)
    assert msg == ("the ranks disagree on the training set's size: 100 on rank(s) 0, 2; 99 on rank(s) 1; "
                   "read the same data")


def test_a_world_of_one_does_not_outlive_its_test(tmp_path):
    """init_distributed writes RANK, WORLD_SIZE, MASTER_PORT... into os.environ for a plain process and leaves them
    there; run in the pytest process (as here, or sample.main in tests/test_image_prompt.py) they reached every later
    test of that xdist worker and its subprocesses (a MASTER_PORT found free minutes earlier). conftest's
    launcher_variables_stay_in_their_test gives each test the variables it found."""
    import subprocess
    import sys

    from launch_utils import ROOT

    probe = tmp_path / "test_probe.py"
    probe.write_text("import os\n\ndef test_nothing_left():\n    left = {k: os.environ[k] for k in "
                     f"{RANK_VARIABLES!r} if k in os.environ}}\n    assert not left, left\n")
    env = {k: v for k, v in os.environ.items() if k not in RANK_VARIABLES and not k.startswith("PYTEST_")}
    leaves = f"{ROOT / 'tests' / 'test_distributed_env.py'}::test_init_distributed_alone_fills_a_world_of_one"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
                           "--rootdir", str(ROOT), "-c", str(ROOT / "pytest.ini"), leaves, str(probe)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "2 passed" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-2000:]
