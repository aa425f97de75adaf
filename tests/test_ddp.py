"""2-process DDP (torchrun, gloo, CPU) gives the single-process result: sharded bank encoding, score reduction."""
import os
import subprocess
import sys

import pytest
import torch

TESTS = os.path.dirname(os.path.abspath(__file__))

SCRIPT = r'''
import os, sys
sys.path.insert(0, sys.argv[1])
import torch
from _tiny import tiny_args, tiny_bert, tiny_cap_config, tiny_dataset
from capsparse.cap import shutdown_distributed
from capsparse.cap.trainer import CAPTrainer

out, world = sys.argv[2], int(os.environ.get("WORLD_SIZE", "1"))
# w_u = w_s = 0: the contrastive terms run (banks, keys) but the in-batch keys are per process by design
cfg = tiny_cap_config(target_sparsity=0.5, w_u=0.0, w_s=0.0, snapshot_mode="eval", max_snapshots=2)
extra = {"ddp_backend": "gloo"} if world > 1 else {}
args = tiny_args(out, per_device_train_batch_size=8 // world, num_train_epochs=2, logging_steps=100, **extra)
trainer = CAPTrainer(tiny_bert(dropout=0.0), args, cfg, tiny_dataset(32), teacher=tiny_bert(seed=1, dropout=0.0))
trainer.train()
if int(os.environ.get("RANK", "0")) == 0:
    state = {k: v.detach().cpu() for k, v in trainer.model.state_dict().items()}
    banks = {n: b.data.clone() for n, b in trainer.banks.banks.items()}
    torch.save({"model": state, "banks": banks, "teacher_logits": trainer.banks.teacher_logits,
                "updates": trainer.pruner.num_updates}, os.path.join(out, "result.pt"))
del trainer  # the DDP model holds the gloo group: free it before exit, or a rank can abort while Python finalizes
shutdown_distributed()
'''


def _env():
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", TOKENIZERS_PARALLELISM="false",
               PYTHONWARNINGS="ignore")
    return env


def test_ddp_two_processes_equal_single(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    single.mkdir(), ddp.mkdir()
    proc = subprocess.run([sys.executable, str(script), TESTS, str(single)], env=_env(), timeout=240,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--standalone", str(script), TESTS, str(ddp)], env=_env(), timeout=240,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    a = torch.load(single / "result.pt", weights_only=False)
    b = torch.load(ddp / "result.pt", weights_only=False)
    for name in a["banks"]:
        torch.testing.assert_close(b["banks"][name], a["banks"][name], rtol=1e-5, atol=1e-5, msg=name)
    torch.testing.assert_close(b["teacher_logits"], a["teacher_logits"], rtol=1e-5, atol=1e-5)
    assert a["updates"] == b["updates"]
    for k in a["model"]:
        torch.testing.assert_close(b["model"][k].float(), a["model"][k].float(), rtol=1e-4, atol=1e-4, msg=k)
