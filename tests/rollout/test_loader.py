"""The checkpoint loader and ``load_weights``: errors that name the problem, round trips of HF
names (v5 fused experts, per-expert checkpoint names, shards, tied embeddings), dummy weights.

Expert parallelism (``MoEParallelConfig(ep_rank, ep_size=2)``): a rank's model holds its half of
the experts, equal to the single model's rows, for per-expert checkpoints (Qwen3, Mixtral's own
names, GLM4), fused [E, ...] checkpoints and dummy weights; the loader reads no tensor of
another rank's experts (recorded at ``safe_open``) and only the rank's rows of fused ones;
``load_weights`` takes a full state dict, copies the rank's experts and checks the others'
shapes."""

from __future__ import annotations

import contextlib
import json
import re
import shutil

import pytest
import torch
from paged_batch import PagedBatchBuilder
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from rollout import loader
from rollout.layers.attention import TorchAttentionBackend, allocate_kv_cache
from rollout.engine.expert_parallel import MoEParallelConfig
from rollout.layers.moe import Router
from rollout.loader import eos_token_ids, load_checkpoint, load_hf_config, resolve_dtype
from rollout.models.registry import MODEL_CLASSES
from rollout.testing import FAMILIES, make_tiny_moe


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return {family: make_tiny_moe(family, root / family) for family in FAMILIES}


def _copy(src, dst, edit=None, config_changes=None):
    shutil.copytree(src, dst)
    if edit is not None:
        tensors = load_file(str(dst / "model.safetensors"))
        edit(tensors)
        save_file(tensors, str(dst / "model.safetensors"))
    if config_changes:
        config = json.loads((dst / "config.json").read_text())
        config.update(config_changes)
        (dst / "config.json").write_text(json.dumps(config))
    return dst


def _forward(model, tokens, num_blocks=16):
    spec = model.attention_spec
    dtype = model.model.embed_tokens.weight.dtype
    model.bind_kv_cache(
        allocate_kv_cache(spec, num_blocks=num_blocks, block_size=4, dtype=dtype, device="cpu")
    )
    builder = PagedBatchBuilder(
        TorchAttentionBackend(spec, block_size=4), num_blocks=num_blocks, block_size=4
    )
    with torch.no_grad():
        return model.compute_logits(model(builder.step([(0, tokens)])))


def test_loads_checkpoint_tokenizer_and_eos(checkpoints):
    loaded = load_checkpoint(checkpoints["qwen3_moe"], device="cpu")
    assert loaded.dtype == torch.float32 and loaded.device == torch.device("cpu")
    assert loaded.tokenizer is not None
    assert loaded.tokenizer.get_vocab_size() == loaded.hf_config.vocab_size
    assert loaded.eos_token_ids == (0,)
    tensors = load_file(str(checkpoints["qwen3_moe"] / "model.safetensors"))
    attn = loaded.model.model.layers[2].self_attn
    q_rows = attn.qkv_proj.shards["q"]
    assert torch.equal(
        attn.qkv_proj.weight[q_rows[0] : q_rows[1]],
        tensors["model.layers.2.self_attn.q_proj.weight"],
    )
    experts = loaded.model.model.layers[2].mlp.experts
    inter = experts.intermediate_size
    assert torch.equal(
        experts.gate_up_proj[5, inter:],
        tensors["model.layers.2.mlp.experts.5.up_proj.weight"],
    )
    assert not any(p.requires_grad for p in loaded.model.parameters())


@pytest.mark.parametrize(
    ("drop", "missing"),
    [
        (
            "model.layers.1.self_attn.k_proj.weight",
            "model.layers.1.self_attn.qkv_proj.weight",
        ),
        (
            "model.layers.2.mlp.experts.3.up_proj.weight",
            "model.layers.2.mlp.experts.gate_up_proj",
        ),
        ("model.norm.weight", "model.norm.weight"),
    ],
)
def test_missing_parameter_is_named(checkpoints, tmp_path, drop, missing):
    path = _copy(checkpoints["qwen3_moe"], tmp_path / "c", edit=lambda t: t.pop(drop))
    with pytest.raises(ValueError, match="missing") as info:
        load_checkpoint(path, device="cpu")
    assert missing in str(info.value)


def test_unknown_parameter_is_named(checkpoints, tmp_path):
    name = "model.layers.0.mlp.router_bias"
    path = _copy(
        checkpoints["qwen2_moe"],
        tmp_path / "c",
        edit=lambda t: t.__setitem__(name, torch.zeros(3)),
    )
    with pytest.raises(ValueError, match="unknown parameter name") as info:
        load_checkpoint(path, device="cpu")
    assert name in str(info.value)


def test_expert_index_out_of_range_is_unknown(checkpoints, tmp_path):
    name = "model.layers.1.mlp.experts.8.gate_proj.weight"  # qwen3_moe has experts 0..7
    path = _copy(
        checkpoints["qwen3_moe"],
        tmp_path / "c",
        edit=lambda t: t.__setitem__(name, torch.zeros(32, 64)),
    )
    with pytest.raises(ValueError, match="unknown parameter name"):
        load_checkpoint(path, device="cpu")


def test_shape_mismatch_is_named(checkpoints, tmp_path):
    name = "model.layers.0.self_attn.q_proj.weight"
    path = _copy(
        checkpoints["mixtral"],
        tmp_path / "c",
        edit=lambda t: t.__setitem__(name, torch.zeros(63, 64)),
    )
    with pytest.raises(ValueError, match="expected shape") as info:
        load_checkpoint(path, device="cpu")
    assert name in str(info.value) and "(63, 64)" in str(info.value)


def test_unknown_architecture_lists_supported(checkpoints, tmp_path):
    path = _copy(
        checkpoints["olmoe"],
        tmp_path / "c",
        config_changes={"architectures": ["DeepseekV3ForCausalLM"]},
    )
    with pytest.raises(ValueError, match="DeepseekV3ForCausalLM") as info:
        load_checkpoint(path, device="cpu")
    assert all(name in str(info.value) for name in MODEL_CLASSES)


def test_bad_arguments_raise(checkpoints, tmp_path):
    with pytest.raises(ValueError, match="config.json"):
        load_checkpoint(tmp_path / "nowhere", device="cpu")
    with pytest.raises(ValueError, match="load_format"):
        load_checkpoint(checkpoints["olmoe"], device="cpu", load_format="pt")
    with pytest.raises(ValueError, match="dtype"):
        load_checkpoint(checkpoints["olmoe"], device="cpu", dtype="int8")
    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy(checkpoints["olmoe"] / "config.json", empty / "config.json")
    with pytest.raises(ValueError, match="safetensors"):
        load_checkpoint(empty, device="cpu")


def test_glm4_skips_multi_token_prediction_layers(checkpoints, tmp_path):
    # GLM-4.5 checkpoints carry the MTP layer as model.layers.{num_hidden_layers}.*; qwen3 must not.
    def add_layer3(t):
        t["model.layers.3.self_attn.q_proj.weight"] = torch.zeros(64, 64)

    load_checkpoint(_copy(checkpoints["glm4_moe"], tmp_path / "g", edit=add_layer3), device="cpu")
    with pytest.raises(ValueError, match="model.layers.3.self_attn.q_proj.weight"):
        load_checkpoint(
            _copy(checkpoints["qwen3_moe"], tmp_path / "q", edit=add_layer3),
            device="cpu",
        )


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_load_weights_round_trip_in_place(checkpoints, family):
    """HF's in-memory v5 names (fused experts, GLM's bias buffer) load in place into a model."""
    reference = load_checkpoint(checkpoints[family], device="cpu").model
    model = load_checkpoint(checkpoints[family], device="cpu", load_format="dummy", seed=1).model
    storage = {name: p.data_ptr() for name, p in model.named_parameters()}
    hf = AutoModelForCausalLM.from_pretrained(checkpoints[family], dtype=torch.float32)
    state = hf.state_dict()
    assert any(name.endswith("mlp.experts.gate_up_proj") for name in state)
    written = model.load_weights(state.items())
    assert written == set(storage)
    for name, param in model.named_parameters():
        assert param.data_ptr() == storage[name], f"{name} was reallocated"
        assert torch.equal(param, reference.get_parameter(name)), name


def test_partial_update_reports_only_complete_parameters(checkpoints):
    model = load_checkpoint(checkpoints["qwen3_moe"], device="cpu").model
    qkv = model.model.layers[0].self_attn.qkv_proj
    start, end = qkv.shards["v"]
    new_v = torch.full((end - start, 64), 0.5)
    before = qkv.weight.clone()
    assert model.load_weights([("model.layers.0.self_attn.v_proj.weight", new_v)]) == set()
    assert torch.equal(qkv.weight[start:end], new_v)
    assert torch.equal(qkv.weight[:start], before[:start])
    full = [
        (f"model.layers.0.self_attn.{p}_proj.weight", qkv.weight[a:b].clone())
        for p, (a, b) in qkv.shards.items()
    ]
    assert model.load_weights(full) == {"model.layers.0.self_attn.qkv_proj.weight"}


def test_sharded_checkpoint(checkpoints, tmp_path):
    hf = AutoModelForCausalLM.from_pretrained(checkpoints["glm4_moe"], dtype=torch.float32)
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
    sharded = load_checkpoint(tmp_path / "sharded", device="cpu").model
    whole = load_checkpoint(checkpoints["glm4_moe"], device="cpu").model
    for name, param in whole.named_parameters():
        assert torch.equal(param, sharded.get_parameter(name)), name


def test_tied_embeddings(tmp_path, rng):
    path = make_tiny_moe("qwen2_moe", tmp_path / "tied", tie_word_embeddings=True)
    assert not any(k.startswith("lm_head") for k in load_file(str(path / "model.safetensors")))
    model = load_checkpoint(path, device="cpu").model
    assert model.lm_head.weight is model.model.embed_tokens.weight
    tokens = torch.randint(0, model.args.vocab_size, (6,), generator=rng).tolist()
    hf = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    with torch.no_grad():
        expected = hf(input_ids=torch.tensor([tokens])).logits[0]
    assert (_forward(model, tokens) - expected).abs().max().item() <= 1e-4
    # An update naming lm_head writes the shared matrix.
    new = torch.randn_like(model.lm_head.weight)
    assert model.load_weights([("lm_head.weight", new)]) == {"model.embed_tokens.weight"}
    assert torch.equal(model.model.embed_tokens.weight, new)


def test_dummy_load_from_config_alone(checkpoints, tmp_path, rng):
    folder = tmp_path / "config_only"
    folder.mkdir()
    shutil.copy(checkpoints["glm4_moe"] / "config.json", folder / "config.json")
    first = load_checkpoint(folder, device="cpu", load_format="dummy", seed=3)
    again = load_checkpoint(folder, device="cpu", load_format="dummy", seed=3).model
    other = load_checkpoint(folder, device="cpu", load_format="dummy", seed=4).model
    model = first.model
    assert first.tokenizer is None and first.eos_token_ids == (0,)
    for name, param in model.named_parameters():
        assert torch.equal(param, again.get_parameter(name)), name
        assert torch.isfinite(param).all(), name
        if name.endswith("norm.weight"):
            assert torch.all(param == 1), name
    assert not torch.equal(
        model.model.layers[1].mlp.gate.weight, other.model.layers[1].mlp.gate.weight
    )

    logits = {}
    hooks = [
        m.register_forward_hook(lambda m, i, o, n=n: logits.__setitem__(n, o[0]))
        for n, m in model.named_modules()
        if isinstance(m, Router)
    ]
    tokens = torch.randint(0, model.args.vocab_size, (200,), generator=rng).tolist()
    assert torch.isfinite(_forward(model, tokens, num_blocks=64)).all()
    for hook in hooks:
        hook.remove()
    # Decisive routing: the k-th and (k+1)-th router logits of a row rarely nearly tie (with the
    # plain N(0, 0.02^2) init about 3% of rows would, at this model's size).
    k = model.routing_params.top_k
    top = torch.cat([x.sort(dim=-1, descending=True).values for x in logits.values()])
    near_ties = (top[:, k - 1] - top[:, k] < 1e-3).float().mean().item()
    assert near_ties <= 0.02


def test_dtypes(checkpoints):
    config = load_hf_config(checkpoints["glm4_moe"])
    assert resolve_dtype("auto", config, torch.device("cpu")) == torch.float32
    config.dtype = torch.bfloat16
    assert resolve_dtype("auto", config, torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype(torch.float16, config, torch.device("cpu")) == torch.float16
    model = load_checkpoint(checkpoints["glm4_moe"], device="cpu", dtype="bfloat16").model
    gate = model.model.layers[1].mlp.gate
    assert model.model.layers[1].self_attn.qkv_proj.weight.dtype == torch.bfloat16
    assert (
        gate.weight.dtype == torch.float32 and gate.e_score_correction_bias.dtype == torch.float32
    )
    assert torch.isfinite(_forward(model, [1, 2, 3, 4, 5])).all()


def test_eos_ids_prefer_generation_config(checkpoints, tmp_path):
    path = _copy(checkpoints["mixtral"], tmp_path / "c")
    config = load_hf_config(path)
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, 7]}))
    assert eos_token_ids(path, config) == (0, 7)
    (path / "generation_config.json").unlink()
    assert eos_token_ids(path, config) == (0,)


# ---- expert parallelism: each rank holds, reads and updates only its experts --------------------

_EXPERT_INDEX = re.compile(r"\.experts\.(\d+)\.")
_FUSED_EXPERTS = ("experts.gate_up_proj", "experts.down_proj")


@contextlib.contextmanager
def _recording_reads(monkeypatch):
    """Record what the loader reads: (name, None) for a whole tensor, (name, index) for a
    slice."""
    reads = []
    real_open = loader.safe_open

    class Slice:
        def __init__(self, inner, name):
            self.inner, self.name = inner, name

        def __getitem__(self, index):
            reads.append((self.name, index))
            return self.inner[index]

    class Recording:
        def __init__(self, f):
            self.f = f

        def keys(self):
            return self.f.keys()

        def get_tensor(self, name):
            reads.append((name, None))
            return self.f.get_tensor(name)

        def get_slice(self, name):
            return Slice(self.f.get_slice(name), name)

    @contextlib.contextmanager
    def recording_open(*args, **kwargs):
        with real_open(*args, **kwargs) as f:
            yield Recording(f)

    monkeypatch.setattr(loader, "safe_open", recording_open)
    yield reads


def _check_rank_model(model, whole, experts):
    """``model`` holds ``experts`` of ``whole``'s experts and every other parameter whole."""
    assert model.local_experts == experts
    names = dict(whole.named_parameters())
    assert {n for n, _ in model.named_parameters()} == set(names)
    for name, param in model.named_parameters():
        want = names[name]
        if name.endswith(_FUSED_EXPERTS):
            assert param.shape == (len(experts), *want.shape[1:]), name
            want = want[experts.start : experts.stop]
        assert torch.equal(param, want), name


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "glm4_moe"])
@pytest.mark.parametrize("rank", [0, 1])
def test_expert_parallel_load_reads_only_its_experts(checkpoints, family, rank, monkeypatch):
    whole = load_checkpoint(checkpoints[family], device="cpu").model
    num_experts = whole.routing_params.num_experts
    experts = range(rank * num_experts // 2, (rank + 1) * num_experts // 2)
    with _recording_reads(monkeypatch) as reads:
        model = load_checkpoint(
            checkpoints[family],
            device="cpu",
            parallel=MoEParallelConfig(ep_rank=rank, ep_size=2),
        ).model
    _check_rank_model(model, whole, experts)
    stored = load_file(str(checkpoints[family] / "model.safetensors"))
    others = {n for n in stored if (m := _EXPERT_INDEX.search(n)) and int(m[1]) not in experts}
    assert others and sorted(reads) == sorted((n, None) for n in set(stored) - others)


def test_expert_parallel_load_slices_fused_expert_tensors(checkpoints, tmp_path, monkeypatch):
    # A checkpoint of HF's in-memory names: fused experts [E, 2I, H] / [E, H, I] on disk.
    folder = _copy(checkpoints["qwen2_moe"], tmp_path / "fused")
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    save_file(
        {n: t.contiguous() for n, t in hf.state_dict().items()},
        folder / "model.safetensors",
    )
    whole = load_checkpoint(folder, device="cpu").model
    with _recording_reads(monkeypatch) as reads:
        model = load_checkpoint(
            folder, device="cpu", parallel=MoEParallelConfig(ep_rank=1, ep_size=2)
        ).model
    _check_rank_model(model, whole, range(4, 8))
    # The fused expert tensors only as rows 4..8, everything else whole.
    fused = {n for n, _ in whole.named_parameters() if n.endswith(_FUSED_EXPERTS)}
    whole_reads = [(n, None) for n in hf.state_dict() if n not in fused]
    want = [(n, slice(4, 8)) for n in fused] + whole_reads
    assert sorted(reads, key=str) == sorted(want, key=str)


def test_expert_parallel_dummy_weights_are_the_single_models_slice(checkpoints):
    whole = load_checkpoint(checkpoints["glm4_moe"], device="cpu", load_format="dummy", seed=5)
    for rank, experts in enumerate([range(8), range(8, 16)]):
        model = load_checkpoint(
            checkpoints["glm4_moe"],
            device="cpu",
            load_format="dummy",
            seed=5,
            parallel=MoEParallelConfig(ep_rank=rank, ep_size=2),
        ).model
        _check_rank_model(model, whole.model, experts)
    # Every expert's rows are drawn on their own: no two experts are equal.
    gate_up = whole.model.model.layers[1].mlp.experts.gate_up_proj
    assert not torch.equal(gate_up[0], gate_up[8])


def test_expert_parallel_load_weights(checkpoints):
    """``load_weights`` on a rank's model takes every expert's tensors: the rank's rows of fused
    ones, its own per-expert ones; other experts' are shape-checked and skipped."""
    whole = load_checkpoint(checkpoints["qwen3_moe"], device="cpu").model
    model = load_checkpoint(
        checkpoints["qwen3_moe"],
        device="cpu",
        load_format="dummy",
        parallel=MoEParallelConfig(ep_rank=1, ep_size=2),
    ).model
    storage = {name: p.data_ptr() for name, p in model.named_parameters()}
    hf = AutoModelForCausalLM.from_pretrained(checkpoints["qwen3_moe"], dtype=torch.float32)
    assert model.load_weights(hf.state_dict().items()) == set(storage)
    _check_rank_model(model, whole, range(4, 8))
    assert all(p.data_ptr() == storage[n] for n, p in model.named_parameters())
    prefix = f"model.layers.{model.moe_layers[0]}.mlp.experts"
    h, i = whole.get_parameter(f"{prefix}.down_proj").shape[1:]
    # Per-expert tensors: rank 1's experts 4..7 written, the others' skipped (no write).
    down = model.get_parameter(f"{prefix}.down_proj")
    before = down.clone()
    other = [(f"{prefix}.{j}.down_proj.weight", torch.ones(h, i)) for j in range(4)]
    assert model.load_weights(other) == set()
    assert torch.equal(down, before)
    mine = [(f"{prefix}.{j}.down_proj.weight", torch.full((h, i), float(j))) for j in range(4, 8)]
    assert model.load_weights(mine) == {f"{prefix}.down_proj"}
    assert torch.equal(down, torch.arange(4, 8.0)[:, None, None].expand(4, h, i))
    # Shapes are checked for every expert, and a fused tensor must hold all E experts.
    with pytest.raises(
        ValueError, match=rf"experts.2.down_proj.weight.* expected shape \({h}, {i}\)"
    ):
        model.load_weights([(f"{prefix}.2.down_proj.weight", torch.ones(h, i - 1))])
    with pytest.raises(ValueError, match=rf"expected shape \(8, {h}, {i}\) .* got \(4, {h}, {i}\)"):
        model.load_weights([(f"{prefix}.down_proj", torch.ones(4, h, i))])
    with pytest.raises(ValueError, match="unknown parameter name"):
        model.load_weights([(f"{prefix}.8.down_proj.weight", torch.ones(h, i))])


def test_experts_that_do_not_split_raise(checkpoints):
    with pytest.raises(ValueError, match=r"num_experts: expected a multiple of .*=3 .* got 8"):
        load_checkpoint(
            checkpoints["qwen3_moe"],
            device="cpu",
            parallel=MoEParallelConfig(ep_rank=0, ep_size=3),
        )
