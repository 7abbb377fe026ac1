"""Datasets for Transformer-VQ: byte corpora, token streams, images as bytes.

Numpy only; knows nothing of the model. Batches are dicts of numpy arrays
(`inputs`, `targets`, `doc_ids`: int32 `[B, T]`; `loss_mask`: float32 `[B, T]`)
laid out so that consecutive steps continue every row, for carried state.
See docs/data.md.
"""

from ._bytes import (
    bundled_corpus_path as bundled_corpus_path,
    ENWIK8_SIZE as ENWIK8_SIZE,
    load_bytes as load_bytes,
    load_documents as load_documents,
    load_splits as load_splits,
    split_bytes as split_bytes,
    TEXT_SUFFIXES as TEXT_SUFFIXES,
)
from ._images import (
    IMAGE_BYTES as IMAGE_BYTES,
    IMAGE_SIZE as IMAGE_SIZE,
    IMAGE_SUFFIXES as IMAGE_SUFFIXES,
    ImageStream as ImageStream,
    load_images as load_images,
)
from ._sentencepiece import SentencePieceTokenizer as SentencePieceTokenizer
from ._stream import (
    AbstractStream as AbstractStream,
    Batch as Batch,
    pack_documents as pack_documents,
    TokenStream as TokenStream,
)
