"""examples/slurm_train.sh under a stand-in SLURM (one node, two CPU processes): the script's torchrun rendezvous,
argument passing and run directory work, and a second submission of the same job resumes instead of restarting."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPT = REPO_ROOT / "examples" / "slurm_train.sh"


def _fake_slurm(bin_dir: Path) -> None:
    """``scontrol`` names this host, ``srun`` runs its command once (one task on one node), ``torchrun`` is ours."""
    tools = {
        "scontrol": "#!/bin/bash\necho localhost\n",
        "srun": '#!/bin/bash\nwhile [[ "$1" == --* ]]; do shift; done\nexec "$@"\n',
        "torchrun": f'#!/bin/bash\nexec "{sys.executable}" -m torch.distributed.run "$@"\n',
    }
    for name, text in tools.items():
        path = bin_dir / name
        path.write_text(text)
        path.chmod(path.stat().st_mode | stat.S_IEXEC)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


def test_slurm_script_trains_and_a_resubmission_resumes(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _fake_slurm(bin_dir)
    run_dir = tmp_path / "run"
    env = dict(os.environ)
    env.update(
        PATH=f"{bin_dir}{os.pathsep}{env['PATH']}",
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT / "src"), env.get("PYTHONPATH")])),
        SLURM_JOB_NODELIST="localhost",
        SLURM_NNODES="1",
        SLURM_JOB_ID="4242",
        GPUS_PER_NODE="2",
        RUN_DIR=str(run_dir),
        OMP_NUM_THREADS="1",
    )
    args = [
        "L0_sanity",
        "device=cpu",
        "parallelism.strategy=ddp",
        "logging.progress_bar=false",
        "logging.tensorboard=false",
        "logging.log_every_n_steps=1",
        "checkpoint.save_final_model=false",
        "checkpoint.save_every_n_steps=2",
    ]
    for steps in (2, 4):
        env["MASTER_PORT"] = str(_free_port())
        result = subprocess.run(
            ["bash", str(SCRIPT), *args, f"num_train_steps={steps}"],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            check=False,
            timeout=600,
        )
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
        assert "1 node(s) x 2 GPU(s)" in result.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["world_size"], summary["resumed_from_step"], summary["final_step"]) == (2, 2, 4)
