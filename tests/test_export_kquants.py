"""K-quants: the numpy port equals a scalar port of llama.cpp's reference quantizers byte for byte, reads back through
the ``gguf`` package's dequantizers within the reference's error, and the per-tensor mix is llama-quantize's."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from finetune_sdk.exporting.kquants import quantize_iq4_nl, quantize_k
from tests import kquant_reference as reference

gguf = pytest.importorskip("gguf")
TYPES = gguf.GGMLQuantizationType


def _blocks() -> np.ndarray:
    """Six super-blocks: Gaussian weights, all positive, leading zeros, all zero, an outlier, a constant."""
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((6, 256)) * 0.05).astype(np.float32)
    x[1] = np.abs(x[1])
    x[2, :40] = 0
    x[3] = 0
    x[4, 17] = 3.0
    x[5] = 0.25
    return x


@pytest.mark.parametrize("type_name,scalar", [
    ("Q2_K", reference.quantize_q2_k),
    ("Q3_K", reference.quantize_q3_k),
    ("Q4_K", lambda block: reference.quantize_q4_or_q5_k(block, 15)),
    ("Q5_K", lambda block: reference.quantize_q4_or_q5_k(block, 31)),
    ("Q6_K", reference.quantize_q6_k),
])
def test_numpy_k_quants_equal_a_scalar_port_of_the_reference_byte_for_byte(type_name, scalar):
    blocks = _blocks()
    packed = quantize_k(blocks, type_name)
    for row, block in zip(packed, blocks):
        assert row.tobytes() == scalar(block)


def test_k_quants_read_back_through_gguf_within_the_reference_error():
    """Relative RMSE on Gaussian weights (the error llama.cpp's reference quantizer reaches, since the bytes are its):
    each K type beats the block-32 type of the same bits, and more bits give less error."""
    rng = np.random.default_rng(0)
    weights = (rng.standard_normal((64, 1024)) * 0.02).astype(np.float32)

    def error(packed, qtype):
        back = gguf.quants.dequantize(packed, qtype)
        assert back.shape == weights.shape
        return float(np.sqrt(((back - weights) ** 2).mean() / (weights ** 2).mean()))

    k = {name: error(quantize_k(weights, name), getattr(TYPES, name))
         for name in ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")}
    block32 = {name: error(gguf.quants.quantize(weights, getattr(TYPES, name)), getattr(TYPES, name))
               for name in ("Q4_0", "Q5_0", "Q8_0")}
    assert k["Q4_K"] < block32["Q4_0"] and k["Q5_K"] < block32["Q5_0"]
    assert block32["Q8_0"] < k["Q6_K"] < k["Q5_K"] < k["Q4_K"] < 0.075  # measured 0.0178, 0.0363, 0.0715
    assert k["Q4_K"] < k["Q3_K"] < 0.16 and k["Q3_K"] < k["Q2_K"] < 0.31  # measured 0.151, 0.296
    with pytest.raises(ValueError, match="multiple of 256"):
        quantize_k(weights[:, :96], "Q4_K")


def _shapes(layers: int, hidden: int = 256, tied: bool = False):
    shapes = [("token_embd.weight", (1000, hidden))]
    for layer in range(layers):
        for part, shape in (("attn_norm", (hidden,)), ("attn_q", (hidden, hidden)), ("attn_k", (64, hidden)),
                            ("attn_v", (64, hidden)), ("attn_output", (hidden, hidden)), ("ffn_gate", (512, hidden)),
                            ("ffn_up", (512, hidden)), ("ffn_down", (hidden, 512))):
            shapes.append((f"blk.{layer}.{part}.weight", shape))
    shapes.append(("output_norm.weight", (hidden,)))
    if not tied:
        shapes.append(("output.weight", (1000, hidden)))
    return shapes


def test_k_mixes_choose_types_per_tensor_as_llama_quantize():
    """8 layers: llama.cpp's use_more_bits picks layers 0, 3, 6 and 7 (first and last eighth, every third)."""
    from finetune_sdk.exporting.quantization import tensor_types

    types = {n: t.name for n, t in tensor_types(_shapes(8), "q4_k_m").items()}
    more = [0, 3, 6, 7]
    assert [types[f"blk.{i}.attn_v.weight"] for i in range(8)] == ["Q6_K" if i in more else "Q4_K" for i in range(8)]
    assert [types[f"blk.{i}.ffn_down.weight"] for i in range(8)] == ["Q6_K" if i in more else "Q4_K"
                                                                     for i in range(8)]
    assert types["output.weight"] == "Q6_K" and types["token_embd.weight"] == "Q4_K"
    assert types["blk.0.attn_q.weight"] == types["blk.3.ffn_up.weight"] == "Q4_K"
    assert types["blk.0.attn_norm.weight"] == "F32"
    small = {n: t.name for n, t in tensor_types(_shapes(8), "q4_k_s").items()}
    assert [small[f"blk.{i}.attn_v.weight"] for i in range(8)] == ["Q5_K"] * 4 + ["Q4_K"] * 4
    assert [small[f"blk.{i}.ffn_down.weight"] for i in range(8)] == ["Q5_K"] + ["Q4_K"] * 7
    five = {n: t.name for n, t in tensor_types(_shapes(8), "q5_k_m").items()}
    assert five["blk.3.attn_v.weight"] == "Q6_K" and five["blk.1.attn_v.weight"] == "Q5_K"
    assert set(n.name for n in tensor_types(_shapes(2), "q6_k").values()) == {"Q6_K", "F32"}
    tied = {n: t.name for n, t in tensor_types(_shapes(2, tied=True), "q4_k_m").items()}
    assert tied["token_embd.weight"] == "Q6_K"  # the embedding doubles as the output matrix
    narrow = {n: t.name for n, t in tensor_types(_shapes(8, hidden=96), "q4_k_m").items()}
    assert narrow["blk.1.attn_q.weight"] == "Q5_0"  # rows of 96: llama.cpp's fallback from Q4_K
    assert narrow["blk.0.attn_v.weight"] == "Q8_0"  # Q6_K falls back to Q8_0
    assert narrow["output.weight"] == "Q8_0"
    five_narrow = {n: t.name for n, t in tensor_types(_shapes(2, hidden=96), "q5_k_s").items()}
    assert five_narrow["blk.0.attn_q.weight"] == "Q5_1"
    odd = {n: t.name for n, t in tensor_types(_shapes(2, hidden=40), "q4_k_m").items()}
    assert odd["blk.0.attn_q.weight"] == "F16"


def test_low_bit_k_mixes_choose_types_as_llama_quantize():
    """q3_k_m: the first 2 value projections Q5_K, ffn_down Q5_K in the first 16th of 16 layers; q2_k: Q3_K for
    attn_v (Q4_K with 4+ query heads per KV head), ffn_down and attn_output."""
    from finetune_sdk.exporting.quantization import tensor_types

    three = {n: t.name for n, t in tensor_types(_shapes(16), "q3_k_m").items()}
    assert [three[f"blk.{i}.attn_v.weight"] for i in range(4)] == ["Q5_K", "Q5_K", "Q4_K", "Q4_K"]
    assert [three[f"blk.{i}.ffn_down.weight"] for i in range(3)] == ["Q5_K", "Q4_K", "Q4_K"]
    assert three["blk.5.attn_output.weight"] == "Q4_K" and three["blk.5.attn_q.weight"] == "Q3_K"
    assert three["output.weight"] == "Q6_K" and three["token_embd.weight"] == "Q3_K"
    large = {n: t.name for n, t in tensor_types(_shapes(4), "q3_k_l").items()}
    assert large["blk.2.attn_v.weight"] == large["blk.2.ffn_down.weight"] == large["blk.2.attn_output.weight"] == "Q5_K"
    assert {n: t.name for n, t in tensor_types(_shapes(4), "q3_k_s").items()}["blk.0.attn_v.weight"] == "Q3_K"
    two = {n: t.name for n, t in tensor_types(_shapes(4), "q2_k").items()}  # attn_q 256 rows, attn_k 64: 4 per KV
    assert two["blk.0.attn_v.weight"] == "Q4_K" and two["blk.0.ffn_down.weight"] == "Q3_K"
    assert two["blk.0.attn_output.weight"] == "Q3_K" and two["blk.0.ffn_up.weight"] == "Q2_K"
    narrow = {n: t.name for n, t in tensor_types(_shapes(4, hidden=96), "q2_k").items()}
    assert narrow["blk.0.ffn_up.weight"] == "IQ4_NL"  # llama.cpp's fallback for Q2_K/Q3_K
    assert narrow["blk.0.ffn_down.weight"] == "Q3_K"  # rows of 512: stays a K type
    three_narrow = {n: t.name for n, t in tensor_types(_shapes(4, hidden=96), "q3_k_s").items()}
    assert three_narrow["blk.0.attn_q.weight"] == three_narrow["blk.0.attn_v.weight"] == "IQ4_NL"
    assert {n: t.name for n, t in tensor_types(_shapes(4, hidden=40), "q2_k").items()}["blk.0.attn_q.weight"] == "F16"


def _iq4_nl_blocks() -> np.ndarray:
    """Rows of 64 (two blocks each): zeros, a constant, one outlier, Gaussian, a negative maximum, tiny values."""
    rng = np.random.default_rng(2)
    x = (rng.standard_normal((7, 64)) * 0.05).astype(np.float32)
    x[0] = 0
    x[1] = 0.25
    x[2, :] = 0.001
    x[2, 5] = 2.0
    x[4, 40] = -1.5
    x[4, 3] = 1.2
    x[5] = -np.abs(x[5])
    x[6] *= 1e-6
    return x


def test_numpy_iq4_nl_equals_a_scalar_port_of_the_reference_byte_for_byte():
    blocks = _iq4_nl_blocks()
    packed = quantize_iq4_nl(blocks)
    assert packed.shape == (7, 36)
    for row, block in zip(packed, blocks):
        assert row.tobytes() == reference.quantize_iq4_nl(block)
    assert packed[0].tobytes() == b"\x00\x00" + b"\x88" * 16 + b"\x00\x00" + b"\x88" * 16  # d 0, level index 8 (1)
    back = gguf.quants.dequantize(packed, TYPES.IQ4_NL)
    assert back[4, 40] < -1.4 and back[2, 5] > 1.9  # the largest magnitude of a block lands on -127 * d
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize_iq4_nl(blocks[:, :40])


def test_iq4_nl_reads_back_through_gguf_closer_than_q4_0():
    """Same bits per value as Q4_0 (4.5): the non-linear levels and the scale search give less error on Gaussian
    weights (relative RMSE measured IQ4_NL 0.0765, Q4_0 0.0862)."""
    rng = np.random.default_rng(0)
    weights = (rng.standard_normal((64, 1024)) * 0.02).astype(np.float32)

    def error(packed, qtype):
        back = gguf.quants.dequantize(packed, qtype)
        return float(np.sqrt(((back - weights) ** 2).mean() / (weights ** 2).mean()))

    iq4_nl = error(quantize_iq4_nl(weights), TYPES.IQ4_NL)
    q4_0 = error(gguf.quants.quantize(weights, TYPES.Q4_0), TYPES.Q4_0)
    assert iq4_nl < 0.078 < 0.085 < q4_0 < 0.088, (iq4_nl, q4_0)


@pytest.mark.slow
def test_low_bit_k_mixes_on_rows_of_160_read_back_through_transformers(tmp_path):
    """A hidden-160 Llama (rows not a multiple of 256) at q2_k and q3_k_m: the Q2_K/Q3_K matrices are IQ4_NL, and
    transformers (which dequantizes through ``gguf``) gives logits close to the float model."""
    from transformers import AutoModelForCausalLM

    from finetune_sdk.exporting.gguf_file import write_gguf
    from finetune_sdk.testing.tiny import tiny_model, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    model = tiny_model("llama", tokenizer, hidden_size=160).eval()
    ids = torch.tensor([tokenizer("the quick brown fox jumps over the lazy dog")["input_ids"]])
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    diffs = {}
    for quantization in ("q2_k", "q3_k_m"):
        summary = write_gguf(model, tokenizer, tmp_path / f"m-{quantization}.gguf", quantization=quantization)
        assert "IQ4_NL" in summary["tensor_types"] and "Q4_0" not in summary["tensor_types"], summary["tensor_types"]
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=f"m-{quantization}.gguf",
                                                        dtype=torch.float32).eval()
        with torch.no_grad():
            diffs[quantization] = (reloaded(input_ids=ids).logits - expected).abs().max().item()
    assert 0 < diffs["q3_k_m"] <= diffs["q2_k"] <= 0.3, diffs  # measured 0.104, 0.152 (logits up to 1.1)


#: relative RMSE per tensor type on normally initialised weights (Gaussian: 0.0715, 0.0363, 0.0178 measured)
TYPE_ERROR_BOUND = {"Q4_K": 0.08, "Q5_K": 0.04, "Q6_K": 0.02}


def test_a_k_quant_file_reads_back_through_transformers(tmp_path):
    """A hidden-256 Llama at q6_k, q5_k_m, q4_k_m: every K tensor read back by the ``gguf`` package is within its
    type's error, and transformers (which dequantizes K types itself) gives logits close to the float model."""
    from transformers import AutoModelForCausalLM

    from finetune_sdk.exporting.architectures import family_of, gguf_tensors
    from finetune_sdk.exporting.gguf_file import write_gguf
    from finetune_sdk.testing.tiny import tiny_model, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    model = tiny_model("llama", tokenizer, hidden_size=256).eval()
    ids = torch.tensor([tokenizer("the quick brown fox jumps over the lazy dog")["input_ids"]])
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    originals = dict(gguf_tensors(model, family_of(model.config)))
    diffs = {}
    for quantization in ("q6_k", "q5_k_m", "q4_k_m"):
        summary = write_gguf(model, tokenizer, tmp_path / f"m-{quantization}.gguf", quantization=quantization)
        assert set(summary["tensor_types"]) >= {"F32", "Q6_K"}
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=f"m-{quantization}.gguf",
                                                        dtype=torch.float32).eval()
        with torch.no_grad():
            diffs[quantization] = (reloaded(input_ids=ids).logits - expected).abs().max().item()
        reader = gguf.GGUFReader(tmp_path / f"m-{quantization}.gguf")
        assert reader.fields["general.file_type"].contents() == int(
            getattr(gguf.LlamaFileType, f"MOSTLY_{quantization.upper()}"))
        for tensor in reader.tensors:
            if tensor.tensor_type.name.endswith("_K"):
                original = originals[tensor.name]
                data = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(original.shape)
                relative = np.sqrt(((data - original) ** 2).mean() / (original ** 2).mean())
                assert relative <= TYPE_ERROR_BOUND[tensor.tensor_type.name], (quantization, tensor.name, relative)
    # logits up to ~1.5 here; measured 0.055, 0.095, 0.187
    assert 0 < diffs["q6_k"] < diffs["q5_k_m"] < diffs["q4_k_m"] <= 0.3, diffs
