"""PEFT's LoRA variants in slots: DoRA and LoRA biases (with rsLoRA and rank/alpha patterns
beside them), mixed per row with plain adapters and the base, equal to PEFT's own forward of
each row alone (PEFT's mixed-batch path refuses DoRA), on every backend and the per-token path,
on a base with and without biases of its own."""

import pytest
import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

from server.errors import InvalidAdapter
from server.lora.pool import BACKENDS, LoraBatch, LoraPool
from server.lora.slots import prepare
from server.lora.weights import AdapterFiles, AdapterInfo

VOCAB = 300
CONFIGS = {
    "dora": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False,
                       use_dora=True),
    "dora-rs": LoraConfig(r=4, lora_alpha=6, target_modules=["k_proj", "o_proj", "up_proj"], init_lora_weights=False,
                          use_dora=True, use_rslora=True, rank_pattern={"up_proj": 2}, alpha_pattern={"o_proj": 3}),
    "biased": LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "gate_proj"], init_lora_weights=False,
                         lora_bias=True),
    "plain": LoraConfig(r=3, lora_alpha=3, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
}
ROWS = ["dora", "__base__", "biased", "dora-rs", "plain", "dora", "biased"]


def tiny(bias: bool = False, seed: int = 0, tied: bool = False):
    """A tiny random Llama: biases in every projection (non-zero) or none; tied embeddings or not."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      initializer_range=0.3, tie_word_embeddings=tied, attention_bias=bias, mlp_bias=bias)
    model = LlamaForCausalLM(cfg).eval()
    if bias:  # zeros by default: make them count
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n.endswith(".bias"):
                    p.normal_(0, 0.5)
    return model


@pytest.fixture(scope="module", params=[False, True], ids=["base-without-bias", "base-with-bias"])
def peft_model(request):
    peft = get_peft_model(tiny(request.param), CONFIGS["dora"], adapter_name="dora")
    for n in list(CONFIGS)[1:]:
        peft.add_adapter(n, CONFIGS[n])
    torch.manual_seed(7)
    with torch.no_grad():  # trained-looking magnitudes and biases (PEFT makes DoRA's factor exactly 1 at first)
        for n, p in peft.named_parameters():
            if "lora_magnitude_vector" in n:
                p.mul_(torch.empty_like(p).uniform_(0.5, 1.5))
            elif "lora_B" in n and n.endswith(".bias"):
                p.normal_(0, 1.0)
    peft.base_bias = request.param
    return peft.eval()


def reference(peft, ids, rows):
    """PEFT's forward of each row alone, with its adapter active (or none)."""
    out = []
    with torch.no_grad():
        for i, name in enumerate(rows):
            if name == "__base__":
                with peft.disable_adapter():
                    out.append(peft(input_ids=ids[i:i + 1]).logits)
            else:
                peft.set_adapter(name)
                out.append(peft(input_ids=ids[i:i + 1]).logits)
    return torch.cat(out)


def files_of(peft, name):
    sd = get_peft_model_state_dict(peft, adapter_name=name)
    return AdapterFiles(AdapterInfo(None, 0, 0, (), "", 0), CONFIGS[name], sd)


def slotted(peft, backend):
    model = tiny(peft.base_bias)  # the same seed: the same base weights as the PEFT model's
    pool = LoraPool(len(CONFIGS), torch.float32, torch.device("cpu"), backend)
    pool.wrap(model, exclude={id(model.lm_head)})
    modules = {n for n, _ in model.named_modules()}
    for slot, name in enumerate(CONFIGS):
        prep = prepare(name, files_of(peft, name), pool, modules, lambda p: model.get_submodule(p).base)
        pool.write(slot, prep.weights, prep.bias, prep.mag)
    return model, pool


def forward(model, pool, ids, rows, per_token):
    slot_of = {n: i for i, n in enumerate(CONFIGS)}
    T = ids.shape[1]
    if per_token:
        idx = torch.tensor([slot_of.get(a, pool.zero_slot) for a in rows for _ in range(T)])
        pool.batch = LoraBatch([], len(rows) * T, torch.device("cpu"), token_slots=idx)
    else:
        segs = [(slot_of[a], i * T, (i + 1) * T) for i, a in enumerate(rows) if a in slot_of]
        pool.batch = LoraBatch(segs, len(rows) * T, torch.device("cpu"))
    try:
        with torch.no_grad():
            return model(input_ids=ids).logits
    finally:
        pool.batch = None


@pytest.mark.parametrize("backend", sorted(BACKENDS) + ["per_token"])
def test_dora_and_lora_bias_rows_equal_peft(peft_model, backend):
    torch.manual_seed(0)
    ids = torch.randint(0, VOCAB, (len(ROWS), 6))
    ref = reference(peft_model, ids, ROWS)
    model, pool = slotted(peft_model, "loop" if backend == "per_token" else backend)
    ours = forward(model, pool, ids, ROWS, per_token=backend == "per_token")
    assert torch.allclose(ours, ref, atol=1e-4, rtol=1e-5), (ours - ref).abs().max()
    # Each variant matters: with DoRA's factor or the bias left out the rows differ.
    layer = pool.layers["model.layers.0.self_attn.q_proj"]
    saved = layer.mag.clone()
    layer.mag.fill_(1.0)
    assert not torch.allclose(forward(model, pool, ids, ROWS, backend == "per_token")[0], ref[0], atol=1e-3)
    layer.mag.copy_(saved)
    layer.bias.zero_()
    assert not torch.allclose(forward(model, pool, ids, ROWS, backend == "per_token")[2], ref[2], atol=1e-3)
    # and the base and plain rows never see another slot's vectors
    assert torch.equal(ours[1], forward(model, pool, ids, ROWS, backend == "per_token")[1])


def test_a_slot_reused_after_a_dora_adapter_is_plain_again(peft_model):
    model, pool = slotted(peft_model, "auto")
    modules = {n for n, _ in model.named_modules()}
    pool.clear(0)  # the DoRA adapter's slot
    prep = prepare("plain", files_of(peft_model, "plain"), pool, modules)
    pool.write(0, prep.weights, prep.bias, prep.mag)
    torch.manual_seed(4)
    ids = torch.randint(0, VOCAB, (2, 5))
    for per_token in (False, True):
        ours = forward(model, pool, ids, ["dora", "plain"], per_token)  # slot 0 ("dora"'s) now holds "plain"
        assert torch.allclose(ours, reference(peft_model, ids, ["plain", "plain"]), atol=1e-4)
    assert not any(layer.is_dora[0] or layer.has_bias[0] for layer in pool.layers.values())


@pytest.mark.parametrize("drop, match", [
    ("lora_magnitude_vector", "lora_magnitude_vector (DoRA) is missing"),
    ("lora_B.bias", "lora_B.bias (lora_bias) is missing"),
])
def test_a_variant_missing_its_tensors_is_refused(peft_model, drop, match):
    model = tiny(peft_model.base_bias)
    pool = LoraPool(2, torch.float32, torch.device("cpu"))
    pool.wrap(model, exclude={id(model.lm_head)})
    name = "dora" if "magnitude" in drop else "biased"
    f = files_of(peft_model, name)
    f = AdapterFiles(f.info, f.config, {k: v for k, v in f.tensors.items() if not k.endswith(drop)})
    with pytest.raises(InvalidAdapter, match=match.replace("(", r"\(").replace(")", r"\)")) as e:
        prepare(name, f, pool, {n for n, _ in model.named_modules()}, lambda p: model.get_submodule(p).base)
    assert e.value.code == "invalid_weights"


def test_variant_tensors_without_the_config_flag_are_refused(peft_model):
    import copy
    model = tiny(peft_model.base_bias)
    pool = LoraPool(2, torch.float32, torch.device("cpu"))
    pool.wrap(model, exclude={id(model.lm_head)})
    f = files_of(peft_model, "dora")
    cfg = copy.deepcopy(f.config)
    cfg.use_dora = False  # PEFT would ignore the magnitudes: serving them would differ
    with pytest.raises(InvalidAdapter, match="in the file but not in its config"):
        prepare("dora", AdapterFiles(f.info, cfg, f.tensors), pool, {n for n, _ in model.named_modules()})


# -- trained copies (modules_to_save) and LoRA on the input embeddings: server/lora/swap.py --------
SWAP_CONFIGS = {
    "emb": LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"], init_lora_weights=False),
    "saved": LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                        modules_to_save=["lm_head", "norm"]),
    "saved-emb": LoraConfig(r=2, lora_alpha=2, target_modules=["o_proj"], init_lora_weights=False,
                            modules_to_save=["embed_tokens"], use_rslora=True),
    "plain": LoraConfig(r=3, lora_alpha=3, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
}
SWAP_ROWS = ["saved", "__base__", "emb", "saved-emb", "plain", "saved", "emb"]


class Separate:
    """One PEFT model per adapter (PEFT refuses LoRA on a module another adapter keeps a copy of)."""

    def __init__(self, tied: bool):
        self.tied, self.models = tied, {}
        torch.manual_seed(11)
        for name, cfg in SWAP_CONFIGS.items():
            peft = get_peft_model(tiny(tied=tied), cfg, adapter_name=name)
            with torch.no_grad():  # trained copies that differ from the base
                for n, p in peft.named_parameters():
                    if "modules_to_save" in n:
                        p.add_(torch.randn_like(p) * 0.3)
            self.models[name] = peft.eval()
        self.base = tiny(tied=tied)

    def state(self, name):
        return get_peft_model_state_dict(self.models[name], adapter_name=name)

    def reference(self, ids, rows):
        with torch.no_grad():
            return torch.cat([(self.base if a == "__base__" else self.models[a])(input_ids=ids[i:i + 1]).logits
                              for i, a in enumerate(rows)])


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied-embeddings"])
def swap_peft(request):
    return Separate(request.param)


def swap_slotted(peft):
    model = tiny(tied=peft.tied)
    pool = LoraPool(len(SWAP_CONFIGS), torch.float32, torch.device("cpu"), "auto")
    pool.wrap(model, exclude={id(model.lm_head)})
    modules = {n for n, _ in model.named_modules()}
    for slot, name in enumerate(SWAP_CONFIGS):
        files = AdapterFiles(AdapterInfo(None, 0, 0, (), "", 0), SWAP_CONFIGS[name], peft.state(name))
        prep = prepare(name, files, pool, modules, lambda p: model.get_submodule(p).base)
        pool.write(slot, prep.weights, prep.bias, prep.mag, prep.copies, prep.embedding)
    return model, pool


def test_trained_copies_and_embedding_lora_rows_equal_peft(swap_peft):
    torch.manual_seed(0)
    ids = torch.randint(0, VOCAB, (len(SWAP_ROWS), 6))
    ref = swap_peft.reference(ids, SWAP_ROWS)
    model, pool = swap_slotted(swap_peft)
    slot_of = {n: i for i, n in enumerate(SWAP_CONFIGS)}
    T = ids.shape[1]
    segs = [(slot_of[a], i * T, (i + 1) * T, 1.0) for i, a in enumerate(SWAP_ROWS) if a in slot_of]
    pool.batch = LoraBatch(segs, len(SWAP_ROWS) * T, torch.device("cpu"), head_segments=segs)  # every row's logits
    try:
        with torch.no_grad():
            ours = model(input_ids=ids).logits
    finally:
        pool.batch = None
    assert torch.allclose(ours, ref, atol=1e-4, rtol=1e-5), (ours - ref).abs().max()
    assert pool.packed_only == {slot_of["emb"], slot_of["saved"], slot_of["saved-emb"]}
    # Each part matters: the head's copy, the norms' copies, the embedding LoRA.
    with torch.no_grad():
        base_logits = model(input_ids=ids).logits  # no step: the base for every row
    for row in (0, 2, 3):
        assert not torch.allclose(base_logits[row], ref[row], atol=1e-3)
    assert torch.allclose(base_logits[1], ref[1], atol=1e-4)


def test_a_slot_freed_of_its_copies_serves_the_next_adapter_exactly(swap_peft):
    model, pool = swap_slotted(swap_peft)
    pool.clear(1)  # "saved": its head and norm copies go
    assert 1 not in pool.packed_only and all(1 not in sm.copies for sm in pool.swaps.values())
    modules = {n for n, _ in model.named_modules()}
    files = AdapterFiles(AdapterInfo(None, 0, 0, (), "", 0), SWAP_CONFIGS["plain"], swap_peft.state("plain"))
    prep = prepare("plain", files, pool, modules)
    pool.write(1, prep.weights)
    ids = torch.randint(0, VOCAB, (1, 5))
    pool.batch = LoraBatch([(1, 0, 5, 1.0)], 5, torch.device("cpu"), head_segments=[(1, 0, 5, 1.0)])
    try:
        with torch.no_grad():
            ours = model(input_ids=ids).logits
    finally:
        pool.batch = None
    assert torch.allclose(ours, swap_peft.reference(ids, ["plain"]), atol=1e-4)


def test_an_embedding_copy_of_another_base_is_refused(swap_peft):
    model = tiny(tied=swap_peft.tied, seed=1)  # other weights: the file's saved embeddings are not this base's
    pool = LoraPool(2, torch.float32, torch.device("cpu"))
    pool.wrap(model, exclude={id(model.lm_head)})
    sd = swap_peft.state("emb")
    assert any(k.endswith("embed_tokens.base_layer.weight") for k in sd)
    with pytest.raises(InvalidAdapter, match="save_embedding_layers") as e:
        prepare("emb", AdapterFiles(AdapterInfo(None, 0, 0, (), "", 0), SWAP_CONFIGS["emb"], sd), pool,
                {n for n, _ in model.named_modules()})
    assert e.value.code == "wrong_base"
