"""query_head="linear": a trainable map on the contrastive query, identity at the start, beside the model."""
import pytest
import torch

from _tiny import tiny_args, tiny_bert, tiny_cap_config, tiny_dataset
from capsparse.cap import CAPConfig
from capsparse.cap.query_head import LinearQueryHead, build_query_head
from capsparse.cap.trainer import CAP_STATE_NAME, CAPTrainer

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _trainer(out, head="linear", max_steps=8, **args):
    cfg = tiny_cap_config(target_sparsity=0.5, w_s=1.0, query_head=head)
    return CAPTrainer(tiny_bert(), tiny_args(out, max_steps=max_steps, **args), cfg, tiny_dataset(32),
                      teacher=tiny_bert(seed=1))


def test_head_starts_at_the_identity():
    head = LinearQueryHead(6)
    q = torch.randn(4, 6)
    torch.testing.assert_close(head(q), q)
    assert build_query_head("none", 6) is None


def test_head_trains_and_changes_the_run_but_not_the_model_keys(tmp_path):
    mapped = _trainer(tmp_path / "linear")
    mapped.train()
    head = mapped.query_head
    assert head is not None
    assert not torch.allclose(head.weight, torch.eye(head.weight.shape[0]))  # it learned
    assert any(p is head.weight for g in mapped.optimizer.param_groups for p in g["params"])
    plain = _trainer(tmp_path / "none", head="none")
    plain.train()
    assert plain.query_head is None
    a, b = mapped.model.state_dict(), plain.model.state_dict()
    assert a.keys() == b.keys()  # training-only: nothing of the head is in the model
    assert any(not torch.allclose(a[k], b[k]) for k in a if k.endswith("weight"))  # the contrast went through it


def test_resume_restores_the_head(tmp_path):
    full = _trainer(tmp_path / "a", max_steps=12, save_strategy="steps", save_steps=6)
    full.train()
    ckpt = tmp_path / "a" / "checkpoint-6"
    state = torch.load(ckpt / CAP_STATE_NAME, weights_only=True)
    assert state["query_head"] is not None
    resumed = _trainer(tmp_path / "b", max_steps=12, save_strategy="steps", save_steps=6)
    resumed.train(resume_from_checkpoint=str(ckpt))
    torch.testing.assert_close(resumed.query_head.weight, full.query_head.weight, rtol=1e-5, atol=1e-6)
    a, b = full.model.state_dict(), resumed.model.state_dict()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=k)
    other = _trainer(tmp_path / "c", head="none", max_steps=12)
    with pytest.raises(ValueError, match="query head.*query_head='none'"):
        other.train(resume_from_checkpoint=str(ckpt))


def test_bad_query_head_is_refused():
    with pytest.raises(ValueError, match="query_head.*'none'.*'linear'.*'mlp'"):
        CAPConfig(query_head="mlp")
    with pytest.raises(ValueError, match="query_head.*use_cap=False"):
        CAPConfig(query_head="linear", use_cap=False)


_AVERAGE = r'''
import torch
import torch.distributed as dist
from capsparse.cap.query_head import LinearQueryHead, average_head_grads
dist.init_process_group("gloo")
rank = dist.get_rank()
head = LinearQueryHead(3)
for p in head.parameters():
    p.grad = torch.full_like(p, float(rank + 1))  # ranks 0 and 1: grads 1 and 2
average_head_grads(head)
assert all(torch.equal(p.grad, torch.full_like(p, 1.5)) for p in head.parameters()), [p.grad for p in head.parameters()]
dist.destroy_process_group()
'''


def test_head_gradients_are_averaged_over_processes(tmp_path):
    """Under torchrun the head sits outside the DDP model, so its gradients are averaged by hand."""
    import os
    import subprocess
    import sys
    script = tmp_path / "average.py"
    script.write_text(_AVERAGE)
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                           str(script)], env=env, timeout=120, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
