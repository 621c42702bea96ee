"""The example scripts run as a user would run them (small sizes), and the MLP one resumes from
its checkpoint exactly."""
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))

import private_gpt2  # noqa: E402
import private_mlp  # noqa: E402

SMALL = ["--samples", "1200", "--batch-size", "100", "--micro-batch", "32", "--epochs", "2", "--seed", "3"]


def test_mlp_example_learns_within_its_budget():
    accuracy, epsilon = private_mlp.main(SMALL)
    assert accuracy > 0.3  # 10 classes: chance is 0.1
    assert 0.99 * 3.0 <= epsilon <= 3.0


def test_mlp_example_resumes_from_its_checkpoint_exactly(tmp_path):
    straight = private_mlp.main(SMALL)
    checkpoint = str(tmp_path / "ck.pt")
    private_mlp.main(SMALL + ["--checkpoint", checkpoint, "--stop-after", "0"])  # interrupted after epoch 0
    resumed = private_mlp.main(SMALL + ["--checkpoint", checkpoint])  # a new process would do the same
    assert resumed == straight  # accuracy and epsilon, to the last bit


@pytest.mark.filterwarnings("ignore")
def test_gpt2_example_runs_under_bf16_autocast():
    epsilon = private_gpt2.main(["--layers", "1", "--width", "64", "--seq-len", "16", "--samples", "100",
                                 "--batch-size", "5", "--steps", "2", "--epsilon", "8", "--seed", "0"])
    assert 0 < epsilon <= 8.0


def test_ddp_example_runs_under_torchrun(tmp_path):
    """Two gloo processes started by torchrun, as the example's docstring says to run it."""
    import subprocess
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          os.path.join(root, "examples", "private_ddp.py"), *SMALL[:6], "--epochs", "3",
                          "--seed", "3"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    lines = run.stdout.splitlines()
    assert "ranks agree: True" in lines
    accuracy, epsilon = (float(w.rstrip(",")) for w in lines[-2].split()[4::3])
    assert accuracy > 0.3 and 0.99 * 3.0 <= epsilon <= 3.0
