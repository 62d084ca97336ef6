"""Starting a model from another's weights (``aigc train --init-from``), below Ray: the tokenizer
extended without moving an id, the weights loaded with the new words' rows fresh, and every way a
source can fail to fit named (``aigc.models.init``)."""

from __future__ import annotations

import pytest
import torch

from aigc.config import load_config
from aigc.models import build_module
from aigc.models.export import export_model
from aigc.models.init import InitError, export_source, init_state, load_init, read_config, read_weights
from aigc.models.tokenizer import Tokenizer
from tiny import TINY

OLD = ["a digit seven", "the number one"]
NEW = ["a mirrored digit seven", "a mirrored zebra"]


def module(tokenizer: Tokenizer, family: str = "diffusion", *extra: str, seed: int = 0):
    torch.manual_seed(seed)
    cfg = load_config(None, [f"model.family={family}", *TINY[family], *extra])
    return build_module(cfg, tokenizer, image_size=8, channels=1)


def test_extend_keeps_every_id_and_appends_the_new_words_then_characters():
    old = Tokenizer.build(OLD)
    new = old.extend(NEW)
    assert new.vocab[: len(old)] == old.vocab
    added = new.vocab[len(old) :]
    assert added == ["mirrored", "zebra", "##z"]  # "b", "m", ... were characters of "number"
    assert new.tokenize("a digit seven") == old.tokenize("a digit seven")
    assert old.extend(OLD).vocab == old.vocab  # nothing new: the same tokenizer


def test_a_fine_tuned_model_starts_from_the_source_and_a_known_word_keeps_its_embedding(tmp_path):
    old = Tokenizer.build(OLD)
    source = module(old, seed=1)
    export_model(source, tmp_path / "src")
    new = old.extend(NEW)
    target = module(new, seed=2)
    fresh = {k: v.clone() for k, v in target.state_dict().items()}
    load_init(target, tmp_path / "src")

    got, src = target.state_dict(), source.state_dict()
    for key, value in got.items():
        if key.endswith("text_encoder.token.weight"):
            assert torch.equal(value[: len(old)], src[key])  # every known word: the source's row
            assert torch.equal(value[len(old) :], fresh[key][len(old) :])  # new words: fresh rows
        else:
            assert torch.equal(value, src[key]), key
    ids, _ = new.encode(["a mirrored digit seven"], 8)
    # The known words of a caption embed as they did in the source: the same ids, the same rows.
    row = target.text_encoder.token.weight[new.index["seven"]]
    assert torch.equal(row, source.text_encoder.token.weight[old.index["seven"]])
    assert ids[0, 1] == old.index["a"]


def test_a_source_that_does_not_fit_names_every_tensor_and_the_config_keys(tmp_path):
    tok = Tokenizer.build(OLD)
    export_model(module(tok, "diffusion", "model.base_channels=16"), tmp_path / "src")
    target = module(tok, "diffusion", "model.base_channels=24", "model.sample_steps=7")
    with pytest.raises(InitError) as err:
        init_state(target, read_weights(tmp_path / "src"), read_config(tmp_path / "src"), "aigc-diffusion/1")
    msg = str(err.value)
    assert "model.base_channels: 16 (source) vs 24" in msg
    assert "model.sample_steps: 4 (source) vs 7" in msg  # every key that differs is listed
    # Every tensor whose shape the width sets, each with both shapes.
    mismatched = [
        k
        for k, v in target.state_dict().items()
        if k in read_weights(tmp_path / "src") and read_weights(tmp_path / "src")[k].shape != v.shape
    ]
    assert len(mismatched) > 5
    for key in mismatched:
        assert f"{key}: source (" in msg
    assert f"{len(mismatched)} tensor(s)" in msg


def test_another_family_and_a_missing_folder_are_clear_errors(tmp_path):
    tok = Tokenizer.build(OLD)
    export_model(module(tok, "vae"), tmp_path / "vae")
    with pytest.raises(InitError, match="is a 'vae' model; this config trains 'diffusion'"):
        load_init(module(tok), tmp_path / "vae")
    with pytest.raises(InitError, match="no export folder there"):
        export_source(str(tmp_path / "nothing"))
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text("{}")
    with pytest.raises(InitError, match="weights.safetensors, tokenizer.json missing"):
        export_source(str(tmp_path / "half"))
