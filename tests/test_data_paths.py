"""Data paths that are not plain files or folders, broken tokenizer and image
files, and text that is not UTF-8: each refused (or warned about) in one
line naming the file, never a hang or a traceback."""

from __future__ import annotations

import os

import numpy as np
import pytest

import tvq_eqx
from tvq_eqx import data, train
from tvq_eqx.train import DataError


def _run(**data_fields):
    return train.RunConfig(
        model=tvq_eqx.TransformerConfig(
            n_vocab=256, d_model=16, d_k=8, d_v=16, n_code=4, n_layer=1, block_len=8
        ),
        data=train.DataConfig(batch_size=2, seq_len=16, **data_fields),
        update_len=8, steps=2, sample_len=0,
    )  # fmt: skip


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this OS")
def test_fifo_as_data_path_is_refused_not_read(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(DataError, match="is a FIFO"):  # was: hung forever
        train.load_run_data(_run(path=str(fifo)))


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="no /dev/zero")
def test_device_as_data_path_is_named():
    with pytest.raises(DataError, match="'/dev/zero' is a device"):  # was: "empty"
        train.load_run_data(_run(path="/dev/zero"))


def test_tokenizer_folder_and_garbage_model(tmp_path):
    with pytest.raises(ValueError, match="is a folder; give the .model file"):
        data.SentencePieceTokenizer.load(tmp_path)
    garbage = tmp_path / "bad.model"
    garbage.write_bytes(b"this is not a sentencepiece model")
    with pytest.raises(ValueError, match="cannot be loaded") as info:
        data.SentencePieceTokenizer.load(garbage)
    assert "\n" not in str(info.value) and str(garbage) in str(info.value)


def test_image_over_the_pixel_limit_is_one_line(tmp_path, monkeypatch):
    from PIL import Image

    path = tmp_path / "big.png"
    Image.new("RGB", (64, 64)).save(path)
    # Pillow refuses images over twice its limit (a "decompression bomb"):
    # a 400-Mpixel file with the default limit, this one with a tiny limit.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(ValueError, match="cannot read image") as info:
        data.load_images(path, size=8)
    assert str(path) in str(info.value)


def test_invalid_utf8_documents_are_counted_in_one_warning(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    text = "the quick brown fox jumps over the lazy dog\n" * 40
    for i in range(12):
        body = text.encode()
        if i < 3:
            body += b"\xff\xfe broken \xc3"
        (docs / f"d{i}.txt").write_bytes(body)
    tok = data.SentencePieceTokenizer.train(docs, vocab_size=40, model_type="bpe")
    model = tmp_path / "t.model"
    tok.save(model)
    run = _run(kind="sentencepiece", path=str(docs), tokenizer=str(model))
    with pytest.warns(UserWarning, match=r"3 document\(s\) .* not UTF-8"):
        loaded = train.load_run_data(run)
    assert all(np.asarray(v).size for v in loaded.splits.values())
