"""Compressed export: round trip gives the same logits, files shrink with sparsity, no pickle."""
import copy
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from capsparse import densify, sparsify
from capsparse.export import META_FILE, WEIGHTS_FILE, export_compressed, is_compressed_dir, load_compressed, size_report
from capsparse.sparsity import sparsity_report
from capsparse.surgery import sparse_layers


def tiny_bert(num_labels=2, hidden=64, layers=2, inter=128, vocab=120):
    config = transformers.BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                                     num_attention_heads=4, intermediate_size=inter, max_position_embeddings=64,
                                     num_labels=num_labels)
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(config).eval()


def prune_randomly(model, density, block_size=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _, mod in sparse_layers(model):
        shape = mod.mask.shape if block_size is None else mod.block_mask.shape
        mask = torch.rand(shape, generator=g) < density
        mod.set_mask(mask)


def inputs(vocab=120):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (3, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    return dict(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids))


@pytest.mark.parametrize("block_size", [None, 16, (32, 16)])
def test_round_trip_same_logits(tmp_path, block_size):
    model = tiny_bert()
    sparsify(model, block_size=block_size)
    prune_randomly(model, 0.3, block_size)
    with torch.no_grad():
        ref = model(**inputs()).logits
    meta = export_compressed(model, tmp_path / "exp", extra_metadata={"task": "sst2"})
    assert is_compressed_dir(tmp_path / "exp")
    assert meta["extra"]["task"] == "sst2"
    loaded = load_compressed(tmp_path / "exp", backend="reference")
    kinds = {type(m).__name__ for _, m in sparse_layers(loaded)}
    assert kinds == {"SparseLinear"}
    assert len(sparse_layers(loaded)) == len(sparse_layers(model))
    for (n1, m1), (n2, m2) in zip(sparse_layers(model), sparse_layers(loaded)):
        assert n1 == n2 and m1.block_size == m2.block_size
        assert torch.equal(m1.element_mask(), m2.element_mask())
        assert torch.equal(m1.weight * m1.element_mask(), m2.weight)
    with torch.no_grad():
        out = loaded(**inputs()).logits
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    assert sparsity_report(loaded).sparsity == pytest.approx(sparsity_report(model).sparsity)


def test_file_shrinks_with_sparsity(tmp_path):
    sizes = {}
    for density in (1.0, 0.5, 0.1):
        model = tiny_bert(hidden=128, inter=512, vocab=50)
        sparsify(model)
        prune_randomly(model, density)
        export_compressed(model, tmp_path / str(density))
        sizes[density] = (tmp_path / str(density) / WEIGHTS_FILE).stat().st_size
    assert sizes[0.1] < sizes[0.5] < sizes[1.0] * 1.05
    # encoder is most of this model: 10% density must cut the file well below half
    assert sizes[0.1] < 0.45 * sizes[1.0]
    rep = size_report(tmp_path / "0.1")
    assert rep["ratio"] < 0.45 and 0.85 < rep["sparsity"] < 0.95


def test_block_export_stores_only_kept_blocks(tmp_path):
    model = tiny_bert(hidden=64, inter=128)
    sparsify(model, block_size=32)
    prune_randomly(model, 0.25, 32)
    export_compressed(model, tmp_path / "e")
    from safetensors import safe_open

    meta = json.loads((tmp_path / "e" / META_FILE).read_text())
    with safe_open(str(tmp_path / "e" / WEIGHTS_FILE), framework="pt") as f:
        for name, info in meta["layers"].items():
            blocks = f.get_tensor(f"{name}.weight")  # under the weight's name, with a shape no dense layer has
            idx = f.get_tensor(f"{name}.weight.block_index")
            assert blocks.shape == (info["nnz_blocks"], 32, 32)
            assert idx.shape == (info["nnz_blocks"], 2) and idx.dtype == torch.int32


def test_dense_model_and_tokenizer(tmp_path):
    model = tiny_bert()
    export_compressed(model, tmp_path / "d")
    loaded = load_compressed(tmp_path / "d")
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs()).logits, model(**inputs()).logits)
    with pytest.raises(FileNotFoundError, match=META_FILE):
        load_compressed(tmp_path)
    model.save_pretrained(tmp_path / "hf")
    assert not is_compressed_dir(tmp_path / "hf")
    transformers.BertTokenizerFast  # noqa: B018 - tokenizer loading is covered by test_cli


def test_structured_compacted_round_trip(tmp_path):
    structured = pytest.importorskip("capsparse.pruning.structured")
    model = tiny_bert(hidden=64, inter=128)
    masks = structured.StructuredMasks(model)
    with torch.no_grad():
        for i, layer in enumerate(structured.encoder_layers(model)):
            hm = getattr(layer.attention.output, structured.HEAD_MASK)
            hm.zero_()
            hm[: i + 1] = 1
            nm = getattr(layer.output, structured.NEURON_MASK)
            nm[::3] = 0
        ref = model(**inputs()).logits
    structured.compact_model(model, masks)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs()).logits, ref, rtol=1e-4, atol=1e-5)
    meta = export_compressed(model, tmp_path / "s")
    assert meta["structure"][0]["heads"] == 1 and meta["structure"][1]["heads"] == 2
    assert 0.3 < meta["sparsity"] < 0.9
    loaded = load_compressed(tmp_path / "s")
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs()).logits, ref, rtol=1e-4, atol=1e-5)


# -- the Hugging Face format and the loud failures ------------------------------------------------------------

def zeros(model):
    return sum(int((p == 0).sum()) for n, p in model.named_parameters() if n.endswith("weight"))


def pruned_model(block_size):
    model = tiny_bert()
    sparsify(model, block_size=block_size)
    prune_randomly(model, 0.3, block_size)
    with torch.no_grad():
        for _, mod in sparse_layers(model):  # pruned entries hold values (they may grow back while training)
            assert (mod.weight[~mod.element_mask()] != 0).all()
    return model


@pytest.mark.parametrize("block_size", [None, 16])
def test_save_pretrained_round_trip(tmp_path, block_size):
    from capsparse import from_pretrained

    model = pruned_model(block_size)
    with torch.no_grad():
        ref = model(**inputs()).logits
    model.save_pretrained(tmp_path / "hf")
    loaded = from_pretrained(tmp_path / "hf", backend="reference")
    assert [n for n, _ in sparse_layers(loaded)] == [n for n, _ in sparse_layers(model)]
    for (_, m1), (_, m2) in zip(sparse_layers(model), sparse_layers(loaded)):
        assert m2.block_size == m1.block_size and torch.equal(m2.element_mask(), m1.element_mask())
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs()).logits, ref, rtol=1e-5, atol=1e-6)
    dense = copy.deepcopy(model)
    densify(dense)
    pruned_zeros = zeros(dense)  # the zeros the pruned model computes with
    assert pruned_zeros > 0.6 * sparsity_report(model).total and zeros(loaded) == pruned_zeros
    assert sparsity_report(loaded).sparsity == pytest.approx(sparsity_report(model).sparsity)
    # plain transformers reads the same directory as the same pruned model, computed densely
    plain = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
    assert not sparse_layers(plain)
    assert zeros(plain) == zeros(loaded)
    with torch.no_grad():
        torch.testing.assert_close(plain(**inputs()).logits, ref, rtol=1e-5, atol=1e-6)


def test_exact_state_dict_keeps_pruned_entries():
    from capsparse.surgery import exact_state_dict

    model = pruned_model(None)
    name, mod = sparse_layers(model)[0]
    assert torch.equal(model.state_dict()[f"{name}.weight"], mod.weight.detach() * mod.mask)
    with exact_state_dict(model):
        assert torch.equal(model.state_dict()[f"{name}.weight"], mod.weight.detach())
    assert torch.equal(model.state_dict()[f"{name}.weight"], mod.weight.detach() * mod.mask)


@pytest.mark.parametrize("block_size", [None, 16])
def test_plain_transformers_refuses_an_export(tmp_path, block_size):
    from capsparse import from_pretrained

    model = pruned_model(block_size)
    export_compressed(model, tmp_path / "exp")
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):  # not random weights, loaded silently
        transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "exp")
    with torch.no_grad():
        ref = model(**inputs()).logits
        torch.testing.assert_close(from_pretrained(tmp_path / "exp", backend="reference")(**inputs()).logits, ref,
                                   rtol=1e-5, atol=1e-6)


def test_version_1_export_still_loads(tmp_path):
    from safetensors.torch import load_file, save_file

    model = pruned_model(None)
    export_compressed(model, tmp_path / "v1")
    meta = json.loads((tmp_path / "v1" / META_FILE).read_text())
    tensors = load_file(str(tmp_path / "v1" / WEIGHTS_FILE))
    for name in meta["layers"]:
        tensors[f"{name}.weight.values"] = tensors.pop(f"{name}.weight")
    save_file(tensors, str(tmp_path / "v1" / WEIGHTS_FILE), metadata={"format": "capsparse-compressed"})
    (tmp_path / "v1" / META_FILE).write_text(json.dumps(dict(meta, format_version=1)))
    with torch.no_grad():
        torch.testing.assert_close(load_compressed(tmp_path / "v1")(**inputs()).logits, model(**inputs()).logits,
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("damage", ["missing", "corrupt", "not-an-object"])
def test_broken_capsparse_json_is_an_error_naming_it(tmp_path, damage):
    from capsparse.export import load_any

    export_compressed(pruned_model(None), tmp_path / "exp")
    meta = tmp_path / "exp" / META_FILE
    if damage == "missing":
        meta.unlink()
    else:
        meta.write_text('{"format": "capsparse-compr' if damage == "corrupt" else "[1, 2]")
    assert is_compressed_dir(tmp_path / "exp")  # the weights file says it is an export: never read as a plain model
    with pytest.raises((FileNotFoundError, ValueError), match=META_FILE):
        load_any(tmp_path / "exp")


def test_load_any_rebuilds_a_save_pretrained_model(tmp_path):
    from capsparse.export import load_any

    model = pruned_model(None)
    model.save_pretrained(tmp_path / "hf")
    loaded, _ = load_any(tmp_path / "hf", num_labels=2, backend="reference")  # what eval / export / predict load
    assert len(sparse_layers(loaded)) == len(sparse_layers(model))
    assert sparsity_report(loaded).sparsity == pytest.approx(sparsity_report(model).sparsity)
    with pytest.raises(ValueError, match="num_labels=2"):
        load_any(tmp_path / "hf", num_labels=3)


def test_from_pretrained_refuses_unknown_tensors(tmp_path):
    from safetensors.torch import load_file, save_file

    from capsparse import from_pretrained

    model = pruned_model(None)
    model.save_pretrained(tmp_path / "hf")
    path = tmp_path / "hf" / WEIGHTS_FILE
    tensors = load_file(str(path))
    tensors["bert.encoder.layer.0.output.dense.movement_scores"] = torch.zeros(64, 128)
    save_file(tensors, str(path), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="movement_scores.*finalize"):
        from_pretrained(tmp_path / "hf")
    tensors.pop("bert.encoder.layer.0.output.dense.movement_scores")
    tensors.pop("bert.encoder.layer.1.output.LayerNorm.weight")
    save_file(tensors, str(path), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="missing.*layer.1.output.LayerNorm.weight"):
        from_pretrained(tmp_path / "hf")
