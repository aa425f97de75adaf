"""CAP memory banks, keys, the objective and the config."""
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from _tiny import tiny_bert
from capsparse.cap import (RECIPES, BankSet, CAPConfig, RepresentationTap, cap_objective, encode_pass,
                           estimate_bank_bytes)
from capsparse.cap.banks import MemoryBank
from capsparse.ops import cap_contrastive_loss_reference


def test_bank_shapes_dtypes_and_estimate():
    banks = BankSet(10, 8, {"prc": 1, "snc": 3, "fic": 1}, dtype="bfloat16")
    assert banks["snc"].data.shape == (10, 3, 8) and banks["prc"].data.shape == (10, 1, 8)
    assert banks["snc"].data.dtype == torch.bfloat16
    assert estimate_bank_bytes(10, {"prc": 1, "snc": 3}, 8, "float16") == 10 * 4 * 8 * 2
    assert estimate_bank_bytes(363846, {"b": 11}, 768, "float32") == 363846 * 11 * 768 * 4  # QQP, ~12.3 GB
    assert banks.ready() == {}


def test_bank_too_big_fails_before_allocating():
    with pytest.raises(MemoryError, match="need .* GiB"):
        BankSet.allocate(10 ** 9, 768, {"prc": 1, "snc": 9, "fic": 1}, "float32", "auto", "cpu")
    with pytest.raises(MemoryError, match="bank_device"):
        BankSet.allocate(10 ** 9, 768, {"prc": 1}, "float32", "cpu", "cpu")


def test_snapshot_growth_and_ring():
    bank = MemoryBank("snc", 4, 3, 2)
    slots = [bank.new_slot() for _ in range(5)]
    assert slots == [0, 1, 2, 0, 1] and bank.count == 3
    bank = MemoryBank("snc", 4, 3, 2)
    bank.write(bank.new_slot(), torch.tensor([0, 1, 2, 3]), torch.ones(4, 2))
    assert bank.gather(torch.tensor([2, 0])).shape == (2, 1, 2)
    bank.write(bank.new_slot(), torch.tensor([3, 2, 1, 0]), -torch.ones(4, 2))
    got = bank.gather(torch.tensor([1]))
    assert got.shape == (1, 2, 2)
    torch.testing.assert_close(got[0, 0], torch.full((2,), 2 ** -0.5))  # stored L2-normalised
    torch.testing.assert_close(got[0, 1], torch.full((2,), -2 ** -0.5))


def test_encode_pass_orders_by_example_id():
    n, d = 13, 6
    table = torch.randn(n, d)
    perm = torch.randperm(n)
    batches = [{"idx": perm[i:i + 4]} for i in range(0, n, 4)]   # shuffled, uneven last batch
    ids, reps, logits = encode_pass(torch.nn.Identity(), batches,
                                    lambda m, b: (table[b["idx"]], table[b["idx"], :2]), n_examples=n,
                                    want_logits=True)
    assert sorted(ids.tolist()) == list(range(n))
    torch.testing.assert_close(reps[torch.argsort(ids)], table)
    torch.testing.assert_close(logits[torch.argsort(ids)], table[:, :2])
    banks = BankSet(n, d, {"prc": 1})
    banks["prc"].write(banks["prc"].new_slot(), ids, reps)
    torch.testing.assert_close(banks["prc"].data[:, 0], F.normalize(table, dim=1))


def test_extra_sampling_without_replacement():
    banks = BankSet(50, 4, {"prc": 1}, seed=3)
    for n in (1, 20, 50, 80):
        got = banks.sample_extra_ids(n)
        assert got.numel() == min(n, 50) and got.unique().numel() == got.numel()
        assert int(got.min()) >= 0 and int(got.max()) < 50
    assert not torch.equal(banks.sample_extra_ids(20), banks.sample_extra_ids(20))  # fresh per call


def test_keys_assembly():
    n, d, b = 40, 8, 4
    labels = torch.arange(n) % 3
    banks = BankSet(n, d, {"snc": 3}, labels=labels, seed=0)
    snc = banks["snc"]
    for _ in range(2):
        snc.write(snc.new_slot(), torch.arange(n), torch.randn(n, d))
    query = torch.randn(b, d, requires_grad=True)
    ids = torch.tensor([5, 1, 7, 30])
    keys, key_ids, key_labels, exclude = banks.keys_for("snc", query, ids, labels[ids], n_extra_keys=20)
    r, m = 2, 20 // 2
    assert keys.shape == (b * (r + 1) + m * r, d) and not keys.requires_grad
    assert torch.equal(key_ids[:b], ids) and torch.equal(exclude, torch.arange(b))
    torch.testing.assert_close(keys[:b], query.detach())
    assert key_ids[b:b + b * r].tolist() == [5, 5, 1, 1, 7, 7, 30, 30]
    torch.testing.assert_close(keys[b:b + 2], snc.data[5, :2])
    extra = key_ids[b + b * r::r]
    assert extra.unique().numel() == m
    assert torch.equal(key_labels, labels[key_ids])


def test_objective_matches_hand_assembled_terms():
    torch.manual_seed(0)
    cfg = CAPConfig(w_ce=0.1, w_kd=0.9, w_u=0.1, w_s=10.0, kd_temperature=2.0, n_extra_keys=8, banks=("prc",))
    n, d, b, c = 20, 8, 4, 3
    labels_all = torch.arange(n) % c
    banks = BankSet(n, d, {"prc": 1}, labels=labels_all, seed=5)
    banks["prc"].write(banks["prc"].new_slot(), torch.arange(n), torch.randn(n, d))
    logits, teacher = torch.randn(b, c, requires_grad=True), torch.randn(b, c)
    query = torch.randn(b, d, requires_grad=True)
    ids = torch.tensor([0, 4, 9, 13])
    labels = labels_all[ids]
    state = banks.generator.get_state()
    total, parts = cap_objective(cfg, logits, labels, ids, query, banks, teacher_logits=teacher,
                                 contrastive_labels=labels)
    banks.generator.set_state(state)
    keys, kid, klab, exc = banks.keys_for("prc", query, ids, labels, 8)
    lu, ls = cap_contrastive_loss_reference(query, keys, ids, kid, labels, klab, 0.1, "official", exc)
    ce = F.cross_entropy(logits, labels)
    kl = F.kl_div(F.log_softmax(logits / 2, -1), F.softmax(teacher / 2, -1), reduction="batchmean") * 4
    torch.testing.assert_close(total, 0.1 * ce + 0.9 * kl + 0.1 * lu + 10.0 * ls, rtol=1e-5, atol=1e-6)
    assert set(parts) == {"ce", "kd", "prc_u", "prc_s"}
    total.backward()
    assert query.grad is not None and logits.grad is not None


def test_representation_tap_query_is_post_dropout_pooler():
    model = tiny_bert(dropout=0.5)
    tap = RepresentationTap(model)
    batch = dict(input_ids=torch.randint(5, 100, (3, 16)), attention_mask=torch.ones(3, 16, dtype=torch.long))
    model.train()
    model(**batch)
    q = tap.representation("pooler", batch["attention_mask"], query=True)
    k = tap.representation("pooler", batch["attention_mask"], query=False)
    assert q.shape == k.shape == (3, 32) and not torch.allclose(q, k)
    assert tap.representation("cls", None, True).shape == (3, 32)
    mean = tap.representation("mean", batch["attention_mask"], True)
    torch.testing.assert_close(mean, tap.base_output.last_hidden_state.mean(1))
    tap.remove()


# -- config ---------------------------------------------------------------------------------------------
def test_recipes_hold_published_defaults(tmp_path):
    glue = CAPConfig.recipe("glue-unstructured")
    assert (glue.method, glue.w_u, glue.w_s, glue.w_ce, glue.w_kd, glue.kd_temperature, glue.temperature) == \
        ("movement", 0.1, 10.0, 0.1, 0.9, 2.0, 0.1)
    assert (glue.schedule_warmup, glue.initial_warmup, glue.final_warmup, glue.score_lr) == (11000, 2, 3, 1e-2)
    # capsparse's one departure in this recipe: the [CLS] query (docs/cap.md, differences); the official pooler
    # query is one override away
    assert glue.representation == "cls" and CAPConfig().representation == "cls"
    assert CAPConfig.recipe("glue-unstructured", representation="pooler").representation == "pooler"
    # layer-wise distillation is an option, off in every recipe (it helped movement, not CAP-m: docs/cap.md, 18)
    assert all(CAPConfig.recipe(n).w_hidden == 0.0 for n in RECIPES) and CAPConfig().w_hidden == 0.0
    st = CAPConfig.recipe("glue-structured")
    assert (st.method, st.w_u, st.w_s, st.kd_temperature, st.structured_steps, st.epochs_per_step) == \
        ("first-order", 0.3, 3.0, 1.0, 9, 2.0)
    assert st.representation == "pooler"  # official; not measured otherwise
    squad = CAPConfig.recipe("squad-unstructured")
    assert (squad.w_u, squad.w_s, squad.representation, squad.schedule_warmup, squad.initial_warmup,
            squad.final_warmup) == (0.5, 0.0, "cls", 5400, 1, 2)
    sq = CAPConfig.recipe("squad-structured", target_sparsity=0.5)
    assert (sq.temperature, sq.w_s, sq.target_sparsity) == (0.3, 0.0, 0.5)
    assert set(RECIPES) == {"glue-unstructured", "glue-structured", "squad-unstructured", "squad-structured"}
    path = tmp_path / "cap.json"
    glue.save(str(path))
    assert CAPConfig.load(str(path)) == glue and json.loads(path.read_text())["method"] == "movement"
    assert "w_s" in str(glue) and CAPConfig.from_dict(glue.to_dict()) == glue


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_official_recipe_differs_only_where_capsparse_departs(name):
    from capsparse.cap.config import OFFICIAL_CODE

    ours, official = CAPConfig.recipe(name).to_dict(), CAPConfig.recipe(name, official=True).to_dict()
    assert {k for k in ours if ours[k] != official[k]} == {k for k, v in OFFICIAL_CODE[name].items() if ours[k] != v}
    assert all(official[k] == v for k, v in OFFICIAL_CODE[name].items())
    assert CAPConfig.recipe(name, official=True, w_u=0.5).w_u == 0.5  # overrides still win
    with pytest.raises(ValueError, match="official: expected True or False, got 'yes'"):
        CAPConfig.recipe(name, official="yes")


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_docs_print_each_recipe_as_the_code_holds_it(name):
    """docs/cap.md shows every recipe as `print(CAPConfig.recipe(name))`: a changed default must change the page."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "cap.md").read_text()
    assert f"### {name}\n\n```\n{CAPConfig.recipe(name)}\n```" in text


@pytest.mark.parametrize("bad,match", [
    (dict(target_sparsity=1.0), r"\[0, 1\)"), (dict(target_sparsity=-0.1), r"\[0, 1\)"), (dict(method="l0"), "method"),
    (dict(normalization="mean"), "normalization"), (dict(banks=("prc", "xyz")), "banks"),
    (dict(block_size=24, method="block-movement"), "block_size"),
    (dict(block_size=32, method="movement"), "block_size"), (dict(representation="max"), "representation")])
def test_config_rejects_bad_values(bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        CAPConfig(**bad)
    with pytest.raises(ValueError, match="unknown field"):
        CAPConfig.from_dict({"methd": "movement"})
    with pytest.raises(ValueError, match="recipe"):
        CAPConfig.recipe("cifar")
