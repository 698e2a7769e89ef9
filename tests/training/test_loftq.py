"""LoftQ's initial fix of nf4's error: the plain SVD fix, the calibrated one, and the inputs it is calibrated on."""

import pytest
import torch

from server.training.loftq import init_from_residual, input_grams, low_rank_fix


def test_the_plain_fix_is_the_best_low_rank_approximation():
    torch.manual_seed(0)
    residual = torch.randn(48, 32)
    b, a = low_rank_fix(residual, rank=4, scaling=2.0)
    assert b.shape == (48, 4) and a.shape == (4, 32)
    s = torch.linalg.svdvals(residual)
    # Eckart-Young: no rank-4 matrix is closer, and this one is exactly that close.
    assert torch.linalg.norm(residual - 2.0 * b @ a) == pytest.approx(float(s[4:].square().sum().sqrt()), rel=1e-4)


def _anisotropic_inputs(n=400, d=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    # A few input channels carry most of the energy, as in a transformer's activations.
    return torch.randn(n, d, generator=g) * torch.logspace(1, -1, d)


def test_the_calibrated_fix_is_the_best_for_the_layers_outputs():
    torch.manual_seed(0)
    residual = torch.randn(48, 32)
    x = _anisotropic_inputs()
    gram = x.T @ x
    b, a = low_rank_fix(residual, rank=4, scaling=2.0, gram=gram, damping=1e-9)
    pb, pa = low_rank_fix(residual, rank=4, scaling=2.0)

    def output_error(bb, aa):
        return float(torch.linalg.norm(x.double() @ (residual - 2.0 * bb @ aa).double().T))

    # The optimum of min ||X (E - L)^T|| over rank 4: the tail of the singular values of E H^(1/2).
    lam, q = torch.linalg.eigh(gram.double())
    s = torch.linalg.svdvals(residual.double() @ (q * lam.sqrt()) @ q.T)
    assert output_error(b, a) == pytest.approx(float(s[4:].square().sum().sqrt()), rel=1e-4)
    assert output_error(b, a) < 0.9 * output_error(pb, pa)   # the plain fix spends rank on idle inputs
    # Isotropic inputs weigh every direction alike: the calibrated fix is then the plain one.
    ib, ia = low_rank_fix(residual, rank=4, scaling=2.0, gram=7.0 * torch.eye(32))
    assert torch.allclose(2.0 * ib @ ia, 2.0 * pb @ pa, atol=1e-5)


@pytest.fixture
def nf4_peft(tiny_model_dir, tmp_path):
    pytest.importorskip("bitsandbytes")   # in the project's requirements: present in every `make` run
    from peft import LoraConfig, get_peft_model

    from server.config import ModelConfig
    from server.model import load_model

    loaded = load_model(ModelConfig(model=str(tiny_model_dir), quantization="nf4", device="cpu"), tmp_path)
    for module in loaded.model.modules():   # keep the trainable layout (as the trainer does)
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                        "up_proj", "down_proj"], lora_dropout=0.0)
    return get_peft_model(loaded.model, cfg)


def test_input_grams_are_each_layers_own_inputs_with_the_adapter_off(nf4_peft):
    seqs = [[5, 9, 14, 3], [7, 7, 2], [11, 4, 8, 19, 6, 1]]
    grams = input_grams(nf4_peft, seqs)
    assert len(grams) == 14   # 7 projections x 2 layers
    inner = nf4_peft.base_model.model.model
    with torch.no_grad():   # layer 0's attention input, by hand: the norm of the embeddings
        x = torch.cat([inner.layers[0].input_layernorm(inner.embed_tokens(torch.tensor(s))).float() for s in seqs])
    q0 = "base_model.model.model.layers.0.self_attn.q_proj"
    assert torch.allclose(grams[q0], x.T @ x, rtol=1e-4, atol=1e-4)
    for p in ("k_proj", "v_proj"):   # one input, one matrix each
        assert torch.equal(grams[q0.replace("q_proj", p)], grams[q0])
    assert grams["base_model.model.model.layers.1.mlp.down_proj"].shape == (inner.config.intermediate_size,) * 2
    # The adapter is off while measuring: a non-zero LoRA in layer 0 leaves layer 1's inputs as they were.
    with torch.no_grad():
        inner.layers[0].self_attn.o_proj.lora_B["default"].weight.fill_(0.5)
    again = input_grams(nf4_peft, seqs)
    assert all(torch.allclose(again[k], grams[k], rtol=1e-5, atol=1e-5) for k in grams)


def test_init_restores_outputs_better_calibrated_than_plain(nf4_peft, tiny_model_dir):
    from server.training.loftq import full_weights

    seqs = [[5, 9, 14, 3, 22, 17], [7, 7, 2, 30], [11, 4, 8, 19, 6, 1, 13]]
    grams = input_grams(nf4_peft, seqs)
    weights = full_weights(tiny_model_dir)
    q0 = nf4_peft.base_model.model.model.layers[0].self_attn.q_proj
    key = "model.layers.0.self_attn.q_proj.weight"
    gram = grams["base_model.model.model.layers.0.self_attn.q_proj"]
    # X^T X = R R with R its symmetric square root, so ||X M^T|| = ||R M^T||: the output error without X.
    lam, q = torch.linalg.eigh(gram.double())
    root = (q * lam.clamp_min(0).sqrt()) @ q.T

    @torch.no_grad()
    def error():   # ||X (W - Q - s B A)^T||: what layer 0's q_proj still gets wrong on these inputs
        import bitsandbytes.functional as bnbf

        w = weights(key).float()
        qw = bnbf.dequantize_4bit(q0.base_layer.weight.data, q0.base_layer.weight.quant_state).float()
        fix = q0.scaling["default"] * q0.lora_B["default"].weight @ q0.lora_A["default"].weight
        return float(torch.linalg.norm(root @ (w - qw - fix).double().T))

    untouched = error()
    assert init_from_residual(nf4_peft, weights) == 14
    plain = error()
    assert init_from_residual(nf4_peft, weights, grams=grams) == 14
    calibrated = error()
    assert calibrated < plain < untouched
