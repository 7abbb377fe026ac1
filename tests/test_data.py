import ast
import sys
from pathlib import Path

import hypothesis.strategies as st
import numpy as np
import pytest
from hypothesis import given, settings

import tvq_eqx.data as data
from tvq_eqx.data import (
    ENWIK8_SIZE,
    IMAGE_BYTES,
    ImageStream,
    TokenStream,
    load_bytes,
    load_documents,
    load_images,
    load_splits,
    pack_documents,
    split_bytes,
)

KEYS = {
    "inputs": np.int32,
    "targets": np.int32,
    "loss_mask": np.float32,
    "doc_ids": np.int32,
    "doc_starts": np.bool_,
}


def epoch(stream):
    return [stream.batch(s) for s in range(stream.num_batches)]


def check_batch(b, batch_size, seq_len):
    assert set(b) == set(KEYS)
    for k, dtype in KEYS.items():
        assert b[k].dtype == dtype and b[k].shape == (batch_size, seq_len), k


# ---------------------------------------------------------------- layering


def test_data_imports_no_model_and_no_jax():
    for f in Path(data.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                assert top not in {"jax", "jaxlib", "equinox", "tvq_eqx"}, (f, name)


# ---------------------------------------------------------------- bytes


def test_bundled_corpus():
    text = load_bytes()
    assert text.dtype == np.uint8 and text.ndim == 1
    assert 400_000 <= text.size <= 600_000
    assert text.max() < 128  # plain ASCII
    decoded = text.tobytes().decode("ascii")
    assert "HAMLET" in decoded and "Gutenberg" not in decoded
    assert (data.bundled_corpus_path().parent / "ATTRIBUTION.md").is_file()


def test_load_file_and_folder(tmp_path):
    f = tmp_path / "one.txt"
    f.write_bytes(b"hello\x00world")
    assert load_bytes(f).tobytes() == b"hello\x00world"
    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    (folder / "b.md").write_bytes(b"BB")
    (folder / "a.txt").write_bytes(b"AA")
    (folder / "sub" / "c.rst").write_bytes(b"CC")
    (folder / "empty.txt").write_bytes(b"")
    (folder / "skip.bin").write_bytes(b"XX")
    (folder / ".hidden.txt").write_bytes(b"HH")
    assert [d.tobytes() for d in load_documents(folder)] == [b"AA", b"BB", b"CC"]
    assert load_bytes(folder).tobytes() == b"AA\nBB\nCC"
    assert load_bytes(folder, separator=b"").tobytes() == b"AABBCC"
    assert load_bytes(folder, suffixes=(".bin",)).tobytes() == b"XX"


def test_load_errors(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        load_bytes(missing)
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="empty.txt.* is empty"):
        load_bytes(empty)
    folder = tmp_path / "dir"
    folder.mkdir()
    (folder / "x.bin").write_bytes(b"data")
    with pytest.raises(ValueError, match="dir.*no non-empty files"):
        load_bytes(folder)
    small = tmp_path / "small.txt"
    small.write_bytes(b"x" * 39)
    with pytest.raises(ValueError, match="small.txt.*too small to split"):
        load_splits(small)


@settings(max_examples=50, deadline=None)
@given(n=st.integers(40, 10_000))
def test_split_partitions_90_5_5(n):
    x = (np.arange(n) % 251).astype(np.uint8)
    s = split_bytes(x)
    assert list(s) == ["train", "validation", "test"]
    np.testing.assert_array_equal(np.concatenate(list(s.values())), x)
    assert s["validation"].size == s["test"].size == n // 20
    assert s["train"].size == n - 2 * (n // 20)


def test_split_enwik8_sizes():
    x = np.zeros(ENWIK8_SIZE, dtype=np.uint8)  # lazily zeroed; no copy taken
    for flag in (None, True):
        s = split_bytes(x, enwik8=flag)
        assert [v.size for v in s.values()] == [90_000_000, 5_000_000, 5_000_000]
        assert all(np.shares_memory(v, x) for v in s.values())
    with pytest.raises(ValueError, match="exactly 100,000,000 bytes"):
        split_bytes(x[:-1], enwik8=True)


def test_enwik8_by_name(tmp_path):
    f = tmp_path / "enwik8"
    f.write_bytes(b"a" * 1000)
    with pytest.raises(ValueError, match="enwik8.*exactly 100,000,000"):
        load_splits(f)


def test_split_too_small():
    with pytest.raises(ValueError, match="too small to split"):
        split_bytes(np.zeros(39, np.uint8))


# ---------------------------------------------------------------- streams


def check_stream_epoch(stream, n):
    """Properties of one epoch of a stream over tokens == arange(n)."""
    b_, t = stream.batch_size, stream.seq_len
    batches = epoch(stream)
    targets_seen = []
    for s, b in enumerate(batches):
        check_batch(b, b_, t)
        m = b["loss_mask"] > 0
        # Targets are inputs shifted by one, within the batch ...
        np.testing.assert_array_equal(b["targets"][:, :-1], b["inputs"][:, 1:])
        # ... and the next token of the (rotated) text wherever they are real.
        np.testing.assert_array_equal(b["targets"][m], (b["inputs"][m] + 1) % n)
        # Padding: pad id, zero mask, doc id -1; real tokens form a prefix.
        pad_in = b["doc_ids"] < 0
        assert np.all(b["inputs"][pad_in] == 0) and np.all(b["targets"][~m] == 0)
        assert np.all(np.diff(pad_in.astype(int), axis=1) >= 0)
        assert np.all(~m | ~pad_in)
        if s + 1 < len(batches):
            # Consecutive steps continue every row.
            nxt = batches[s + 1]
            np.testing.assert_array_equal(nxt["inputs"][:, 0], b["targets"][:, -1])
        targets_seen.append(b["targets"][m])
    seen = np.concatenate(targets_seen)
    # Every token is a target at most once per epoch; only row starts are not.
    assert np.unique(seen).size == seen.size
    first = batches[0]["inputs"][batches[0]["doc_ids"][:, 0] >= 0, 0]
    assert seen.size == n - first.size
    assert not np.isin(first, seen).any()


@settings(max_examples=60, deadline=None)
@given(
    batch_size=st.integers(1, 5),
    seq_len=st.integers(1, 9),
    extra=st.integers(0, 60),
    seed=st.integers(0, 2**31),
    shuffle=st.booleans(),
)
def test_token_stream_properties(batch_size, seq_len, extra, seed, shuffle):
    n = batch_size * (seq_len + 1) + extra
    stream = TokenStream(
        np.arange(n, dtype=np.int32),
        batch_size=batch_size,
        seq_len=seq_len,
        seed=seed,
        shuffle=shuffle,
    )
    check_stream_epoch(stream, n)
    # Later epochs have the same properties.
    stream_e1 = _ShiftedEpoch(stream, 1)
    check_stream_epoch(stream_e1, n)


class _ShiftedEpoch:
    """View of a stream's epoch `e` as if it were epoch 0 (test helper)."""

    def __init__(self, stream, e):
        self.stream, self.e = stream, e
        self.batch_size, self.seq_len = stream.batch_size, stream.seq_len
        self.num_batches = stream.num_batches

    def batch(self, s):
        return self.stream.batch(self.e * self.num_batches + s)


def test_unshuffled_rows_are_contiguous_slices():
    n, b, t = 103, 4, 5
    tokens = np.arange(n, dtype=np.int64) * 7 % 256
    stream = TokenStream(
        tokens.astype(np.uint8), batch_size=b, seq_len=t, shuffle=False, repeat=False
    )
    batches = list(stream)
    # A row's text: its first input, then every target.
    rows = np.concatenate(
        [batches[0]["inputs"][:, :1]] + [x["targets"] for x in batches], axis=1
    )
    length = -(-n // b)
    assert stream.num_batches == -(-(length - 1) // t)
    for r in range(b):
        want = tokens[r * length : (r + 1) * length]
        np.testing.assert_array_equal(rows[r, : want.size], want)
        np.testing.assert_array_equal(rows[r, want.size :], 0)
    # The last row holds 103 - 3 * 26 = 25 tokens and ends in padding.
    mask = np.concatenate([x["loss_mask"] for x in batches], axis=1)
    np.testing.assert_array_equal(mask.sum(axis=1), [25, 25, 25, 24])
    assert mask[3, -1] == 0 and batches[-1]["targets"][3, -1] == 0


def test_seed_determinism_and_resume():
    tokens = np.arange(5000, dtype=np.int32)
    kw = dict(batch_size=3, seq_len=16)
    a, a2 = TokenStream(tokens, seed=1, **kw), TokenStream(tokens, seed=1, **kw)
    c = TokenStream(tokens, seed=2, **kw)
    for s in (0, 5, a.num_batches + 3):
        for k in KEYS:
            np.testing.assert_array_equal(a.batch(s)[k], a2.batch(s)[k])
    assert not np.array_equal(a.batch(0)["inputs"], c.batch(0)["inputs"])
    # A new epoch is reshuffled.
    assert not np.array_equal(a.batch(0)["inputs"], a.batch(a.num_batches)["inputs"])
    assert a.epoch_and_window(a.num_batches + 3) == (1, 3)
    # Resuming at step k equals iterating to step k.
    k = a.num_batches - 2  # crosses the epoch boundary
    it0, itk = a.iterate(), a.iterate(k)
    ref = [next(it0) for _ in range(k + 6)][k:]
    got = [next(itk) for _ in range(6)]
    for x, y in zip(ref, got, strict=True):
        for key in KEYS:
            np.testing.assert_array_equal(x[key], y[key])


def test_single_pass_for_eval():
    stream = TokenStream(
        np.arange(500, dtype=np.int32),
        batch_size=2,
        seq_len=8,
        shuffle=False,
        repeat=False,
    )
    assert len(list(stream)) == stream.num_batches
    assert len(list(stream.iterate(stream.num_batches - 1))) == 1
    with pytest.raises(IndexError, match="single epoch"):
        stream.batch(stream.num_batches)


def test_stream_errors():
    tokens = np.arange(100, dtype=np.int32)
    with pytest.raises(ValueError, match="seq_len must be >= 1, got 0"):
        TokenStream(tokens, batch_size=2, seq_len=0)
    with pytest.raises(ValueError, match="batch_size must be >= 1, got -1"):
        TokenStream(tokens, batch_size=-1, seq_len=4)
    with pytest.raises(TypeError, match="seq_len must be an int"):
        TokenStream(tokens, batch_size=2, seq_len=True)
    with pytest.raises(ValueError, match="shorter than one window: 100 tokens"):
        TokenStream(tokens, batch_size=4, seq_len=25)
    TokenStream(tokens, batch_size=4, seq_len=24)  # exactly one window fits
    with pytest.raises(ValueError, match="seed must be >= 0"):
        TokenStream(tokens, batch_size=2, seq_len=4, seed=-3)
    with pytest.raises(ValueError, match="doc_starts"):
        TokenStream(tokens, batch_size=2, seq_len=4, doc_starts=np.array([3, 50]))
    with pytest.raises(ValueError, match="step must be >= 0"):
        TokenStream(tokens, batch_size=2, seq_len=4).batch(-1)


# ---------------------------------------------------------------- documents


def test_pack_documents():
    docs = [
        np.frombuffer(b"abc", np.uint8),
        np.frombuffer(b"", np.uint8),
        np.frombuffer(b"de", np.uint8),
    ]
    tokens, starts = pack_documents(docs)
    assert tokens.dtype == np.uint8 and tokens.tobytes() == b"abcde"
    np.testing.assert_array_equal(starts, [0, 3, 3])
    tokens, starts = pack_documents(docs, separator=256)
    assert tokens.dtype == np.uint16
    np.testing.assert_array_equal(tokens, [256, 97, 98, 99, 256, 256, 100, 101])
    np.testing.assert_array_equal(starts, [0, 4, 5])
    with pytest.raises(ValueError, match="at least one document"):
        pack_documents([])
    with pytest.raises(ValueError, match="document 1 must be a 1-D integer"):
        pack_documents([np.arange(3), np.ones(3)])


@pytest.mark.parametrize("shuffle", [False, True])
def test_doc_ids(shuffle):
    lengths = [7, 30, 1, 12, 25, 9, 40]
    docs = [np.full(k, i, dtype=np.int32) for i, k in enumerate(lengths)]
    tokens, starts = pack_documents(docs)
    true_doc = tokens.copy()  # every token holds its own document id
    n = tokens.size
    stream = TokenStream(
        np.arange(n, dtype=np.int32),
        batch_size=3,
        seq_len=6,
        doc_starts=starts,
        shuffle=shuffle,
        seed=5,
    )
    for e in range(2):
        batches = [
            stream.batch(e * stream.num_batches + s) for s in range(stream.num_batches)
        ]
        ids = np.concatenate([b["doc_ids"] for b in batches], axis=1)
        pos = np.concatenate([b["inputs"] for b in batches], axis=1)
        real = ids >= 0
        # Ids are the true document, offset by num_docs after the wrap-around.
        assert np.all((ids[real] % len(docs)) == true_doc[pos[real]])
        if not shuffle:
            assert np.all(ids[real] < len(docs))
        for row, ok in zip(ids, real, strict=True):
            assert np.all(np.diff(row[ok]) >= 0)  # increasing along each row


def test_bundled_corpus_stream_reads_text():
    train = load_splits()["train"]
    stream = TokenStream(train, batch_size=2, seq_len=64, seed=0)
    b0, b1 = stream.batch(0), stream.batch(1)
    row = np.concatenate([b0["inputs"][0], b1["inputs"][0]]).astype(np.uint8)
    assert row.tobytes() in train.tobytes()


# ---------------------------------------------------------------- images


def _write_images(folder):
    from PIL import Image

    folder.mkdir()
    (folder / "nested").mkdir()
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (10, 20, 30), (200, 100, 0)]
    for i, c in enumerate(colours):
        size = [(64, 64), (80, 100), (128, 128), (30, 20), (64, 64)][i]
        where = folder / "nested" if i == 4 else folder
        Image.new("RGB", size, c).save(where / f"img{i}.png")
    (folder / "notes.txt").write_text("not an image")
    return colours


def test_load_images(tmp_path):
    from PIL import Image

    colours = _write_images(tmp_path / "imgs")
    images = load_images(tmp_path / "imgs")
    assert images.shape == (5, IMAGE_BYTES) and images.dtype == np.uint8
    for img, colour in zip(images, colours, strict=True):
        assert np.all(img.reshape(64 * 64, 3) == colour)
    # Center crop of a wide image keeps the middle; RGB interleaved, row-major.
    wide = np.zeros((64, 128, 3), np.uint8)
    wide[:, :32] = (255, 0, 0)
    wide[:, 32:96] = (0, 255, 0)
    wide[:, 96:] = (0, 0, 255)
    wide[0, 33] = (1, 2, 3)
    Image.fromarray(wide).save(tmp_path / "wide.png")
    flat = load_images(tmp_path / "wide.png")[0]
    np.testing.assert_array_equal(flat[3:6], [1, 2, 3])  # pixel (0, 1)
    assert np.all(flat.reshape(-1, 3)[6:] == (0, 255, 0))


def test_load_images_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing"):
        load_images(tmp_path / "missing")
    (tmp_path / "none").mkdir()
    with pytest.raises(ValueError, match="no images"):
        load_images(tmp_path / "none")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "junk.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="cannot read image .*junk.png"):
        load_images(tmp_path / "bad")


def _tagged_images(n, d=IMAGE_BYTES):
    """Image i is filled with i, so every byte tells its image."""
    return np.repeat(np.arange(1, n + 1, dtype=np.uint8)[:, None], d, axis=1)


def test_image_stream_whole_images():
    images = _tagged_images(7)
    stream = ImageStream(images, batch_size=3, seed=0)
    assert stream.seq_len == IMAGE_BYTES and stream.num_batches == 3
    seen = []
    for s, b in enumerate(epoch(stream)):
        check_batch(b, 3, IMAGE_BYTES)
        for row in range(3):
            ids = b["doc_ids"][row]
            if ids[0] < 0:  # a padding image
                assert np.all(b["loss_mask"][row] == 0)
                assert np.all(b["inputs"][row] == 0)
                continue
            assert np.all(ids == ids[0]) and ids[0] == 3 * row + s
            assert np.unique(b["inputs"][row]).size == 1  # one whole image
            seen.append(int(b["inputs"][row, 0]))
    assert sorted(seen) == list(range(1, 8))
    other = ImageStream(images, batch_size=3, seed=1)

    def order(st_):
        return [int(st_.batch(s)["inputs"][r, 0]) for r in range(3) for s in range(3)]

    assert order(stream) == order(ImageStream(images, batch_size=3, seed=0))
    assert order(stream) != order(other)
    plain = ImageStream(images, batch_size=3, shuffle=False)
    assert order(plain)[:7] == [1, 2, 3, 4, 5, 6, 7]


@pytest.mark.parametrize("seq_len", [IMAGE_BYTES // 4, 2 * IMAGE_BYTES])
def test_image_stream_windows(seq_len):
    n, b = 5, 2
    images = np.random.default_rng(0).integers(0, 256, (n, 64, 64, 3), dtype=np.uint8)
    stream = ImageStream(images, batch_size=b, seq_len=seq_len, seed=3)
    batches = epoch(stream)
    rows = np.concatenate([x["inputs"] for x in batches], axis=1)
    ids = np.concatenate([x["doc_ids"] for x in batches], axis=1)
    flat = images.reshape(n, -1)
    for r in range(b):
        for slot in np.unique(ids[r][ids[r] >= 0]):
            seg = rows[r][ids[r] == slot]
            assert seg.size == IMAGE_BYTES
            assert any(np.array_equal(seg, f) for f in flat)
    for s in range(len(batches) - 1):
        np.testing.assert_array_equal(
            batches[s + 1]["inputs"][:, 0], batches[s]["targets"][:, -1]
        )


def test_image_stream_errors():
    images = _tagged_images(4)
    with pytest.raises(ValueError, match="seq_len 1000 must divide"):
        ImageStream(images, batch_size=2, seq_len=1000)
    with pytest.raises(ValueError, match="4 images are fewer than batch_size 5"):
        ImageStream(images, batch_size=5)
    with pytest.raises(ValueError, match="num_images > 0"):
        ImageStream(images[:0], batch_size=1)


# ---------------------------------------------------------------- sentencepiece


def test_sentencepiece_roundtrip(tmp_path):
    pytest.importorskip("sentencepiece")
    tok = data.SentencePieceTokenizer.train(vocab_size=300, model_type="bpe")
    assert tok.vocab_size == 300 and tok.pad_id == 0
    line = "To be, or not to be, that is the question"
    ids = tok.encode(line)
    assert ids.dtype == np.int32 and 0 < ids.size < len(line)
    assert tok.decode(ids) == line
    tok.save(tmp_path / "m.model")
    again = data.SentencePieceTokenizer.load(tmp_path / "m.model")
    np.testing.assert_array_equal(again.encode(line), ids)


def test_sentencepiece_missing_is_clear(monkeypatch):
    monkeypatch.setitem(sys.modules, "sentencepiece", None)
    with pytest.raises(ImportError, match="pip install sentencepiece"):
        data.SentencePieceTokenizer.train(vocab_size=100)


def test_byte_codec_and_item_split():
    text = "héllo\n"
    toks = data.encode_bytes(text)
    assert toks.dtype == np.int32 and toks.tolist() == list(text.encode("utf-8"))
    assert data.decode_bytes(toks) == text
    assert data.decode_bytes([0xFF]) == "\ufffd"
    parts = data.split_items(list(range(40)), what="documents")
    assert (len(parts["train"]), len(parts["validation"]), len(parts["test"])) == (
        36,
        2,
        2,
    )
    assert parts["train"] + parts["validation"] + parts["test"] == list(range(40))
    assert [len(v) for v in data.split_items([1, 2, 3]).values()] == [1, 1, 1]
    with pytest.raises(ValueError, match="need >= 3 images"):
        data.split_items([1, 2], what="images")
