"""The prefill/decode graph of a causal LM: signature, cache layout, parity with PyTorch."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from quantizer.decoder_export import OrtDecoder, torch_greedy
from service.generation.cache import left_pad
from quantizer.engines import ort_session
from quantizer.export import export_decoder
from tests.tiny_llama import tiny_llama


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    work = tmp_path_factory.mktemp("decoder")
    checkpoint = tiny_llama(work)
    return checkpoint, export_decoder(checkpoint, work / "decoder.onnx")


def test_signature_and_cache_layout(exported):
    checkpoint, info = exported
    config = checkpoint.config
    session = ort_session(info.path)
    inputs = [i.name for i in session.get_inputs()]
    assert inputs[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert len(inputs) == 3 + 2 * config.encoder.num_layers
    decoder = OrtDecoder.for_checkpoint(session, checkpoint)
    ids, mask = left_pad([[5, 6, 7, 8], [9, 10]], config.pad_token_id)
    logits, present = decoder.run(ids, mask, None)
    assert logits.shape == (2, config.vocab_size)  # the last position only
    assert present[0].shape == (2, config.key_value_heads, 4, config.attention_head_dim)  # kv heads, not 4


def test_output_projection_is_untied(exported):
    checkpoint, info = exported
    graph = onnx.load(str(info.path)).graph
    table = checkpoint.model.embedding.parts["word"].weight.detach().numpy()
    weights = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    gathers = [n for n in graph.node if n.op_type == "Gather" and n.input[0] in weights]
    matmuls = [n for n in graph.node if n.op_type == "MatMul" and n.input[1] in weights
               and weights[n.input[1]].shape == table.T.shape]
    assert len(gathers) == 1 and len(matmuls) == 1
    assert gathers[0].input[0] != matmuls[0].input[1]
    np.testing.assert_array_equal(weights[matmuls[0].input[1]], table.T)


def test_greedy_tokens_equal_pytorch_and_rows_do_not_see_their_padding(exported):
    checkpoint, info = exported
    decoder = OrtDecoder.for_checkpoint(ort_session(info.path), checkpoint)
    prompts = [[11, 12, 13, 14, 15, 16, 17], [20, 21], [30, 31, 32, 33]]
    tokens, logits = decoder.greedy(prompts, 12)
    ref_tokens, ref_logits = torch_greedy(checkpoint.model, prompts, 12, checkpoint.config.pad_token_id)
    np.testing.assert_array_equal(tokens, ref_tokens)
    assert max(float(np.abs(a - b).max()) for a, b in zip(logits, ref_logits)) < 1e-4
    assert len(set(tokens[0].tolist())) > 1  # a model that says one token proves little
    for row, prompt in enumerate(prompts):
        alone, alone_logits = decoder.greedy([prompt], 12)
        np.testing.assert_array_equal(alone[0], tokens[row])
        assert max(float(np.abs(a[0] - b[row]).max()) for a, b in zip(alone_logits, logits)) < 1e-4


def test_encoders_are_refused(tmp_path, tiny_checkpoint=None):
    from training.checkpoint import Checkpoint, HeadInfo
    from training.config import load_config
    from training.model import build_model

    bert = Checkpoint(model=build_model(load_config("tiny-bert")), head=HeadInfo(task="mlm"),
                      tokenizer=None, path=tmp_path)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="causal LM"):
        export_decoder(bert, tmp_path / "x.onnx")
