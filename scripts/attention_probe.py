"""How far a pruned student's self-attention has drifted from its teacher's, layer by layer.

    python scripts/attention_probe.py TEACHER_DIR STUDENT_EXPORT [STUDENT_EXPORT ...] --task mrpc

For each model, on the first ``--examples`` dev examples: the mean entropy of the attention rows (nats, over
heads and real query tokens; uniform attention over ``n`` tokens has ``ln n``), for sentence-pair tasks the share
of the first sentence's attention that lands on the second sentence, and for each student the mean
``KL(A_teacher || A_student)`` per row. Students are ``capsparse prune`` exports (``load_compressed``). Prints a
table; ``--out`` also writes it as JSON.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def attention_maps(model, enc):
    with torch.no_grad():
        return model(**enc, output_attentions=True).attentions


def row_stats(maps, enc, teacher_maps=None):
    mask = enc["attention_mask"].bool()
    first = (enc["token_type_ids"] == 0) & mask if "token_type_ids" in enc else mask
    second = (enc["token_type_ids"] == 1) & mask if "token_type_ids" in enc else None
    out = {"entropy": [], "cross_share": [], "kl_from_teacher": []}
    for layer, a in enumerate(maps):
        heads = a.shape[1]
        rows = mask[:, None, :].expand(-1, heads, -1)
        ent = -(a.clamp_min(1e-12).log() * a).sum(-1)
        out["entropy"].append(float(ent[rows].mean()))
        if second is not None and bool(second.any()):
            onto = (a * second[:, None, None, :]).sum(-1)
            out["cross_share"].append(float(onto[first[:, None, :].expand(-1, heads, -1)].mean()))
        if teacher_maps is not None:
            t = teacher_maps[layer]
            kl = (t * (t.clamp_min(1e-12).log() - a.clamp_min(1e-12).log())).sum(-1)
            out["kl_from_teacher"].append(float(kl[rows].mean()))
    return {k: v for k, v in out.items() if v}


def eager(model):
    model.set_attn_implementation("eager")  # sdpa returns no attention weights
    return model.eval()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("teacher", help="dense model directory (the students' teacher)")
    p.add_argument("students", nargs="+", help="compressed exports of pruned students")
    p.add_argument("--task", default="mrpc", help="GLUE task whose dev set is read")
    p.add_argument("--glue-dir", default=None)
    p.add_argument("--examples", type=int, default=64, help="dev examples (first N)")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="JSON file for the table")
    a = p.parse_args(argv)
    if a.examples < 1:
        p.error(f"--examples: got {a.examples}, expected a positive integer")
    import transformers

    from capsparse.data import get_glue_task, load_glue
    from capsparse.export import load_compressed

    torch.set_num_threads(a.threads)
    task = get_glue_task(a.task)
    dev = load_glue(task.name, "validation", glue_dir=a.glue_dir)
    n = min(a.examples, len(dev))
    texts = [list(dev[f][:n]) for f in task.text_fields]
    tokenizer = transformers.AutoTokenizer.from_pretrained(a.teacher)
    enc = tokenizer(*texts, truncation=True, max_length=a.max_length, padding=True, return_tensors="pt")
    teacher = eager(transformers.AutoModelForSequenceClassification.from_pretrained(a.teacher))
    teacher_maps = attention_maps(teacher, enc)
    table = {"teacher": row_stats(teacher_maps, enc)}
    for path in a.students:
        table[path] = row_stats(attention_maps(eager(load_compressed(path)), enc), enc, teacher_maps)
    for name, stats in table.items():
        print(name)
        for key, values in stats.items():
            print(f"  {key:16s} " + " ".join(f"{v:6.3f}" for v in values))
    if a.out:
        Path(a.out).write_text(json.dumps({"task": task.name, "examples": n, "models": table}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
