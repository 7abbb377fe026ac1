"""Datasets for Transformer-VQ: byte corpora, token streams, images as bytes.

Numpy only; knows nothing of the model. Batches are dicts of numpy arrays
(`inputs`, `targets`, `doc_ids`: int32 `[B, T]`; `loss_mask`: float32 `[B, T]`;
`doc_starts`: bool `[B, T]`, True where a packed document starts) laid out so
that consecutive steps continue every row, for carried state.
See docs/data.md.
"""

from ._bytes import (
    ENWIK8_SIZE as ENWIK8_SIZE,
)
from ._bytes import (
    TEXT_SUFFIXES as TEXT_SUFFIXES,
)
from ._bytes import (
    bundled_corpus_path as bundled_corpus_path,
)
from ._bytes import (
    decode_bytes as decode_bytes,
)
from ._bytes import (
    encode_bytes as encode_bytes,
)
from ._bytes import (
    load_bytes as load_bytes,
)
from ._bytes import (
    load_documents as load_documents,
)
from ._bytes import (
    load_splits as load_splits,
)
from ._bytes import (
    split_bytes as split_bytes,
)
from ._files import split_items as split_items
from ._images import (
    IMAGE_BYTES as IMAGE_BYTES,
)
from ._images import (
    IMAGE_SIZE as IMAGE_SIZE,
)
from ._images import (
    IMAGE_SUFFIXES as IMAGE_SUFFIXES,
)
from ._images import (
    ImageStream as ImageStream,
)
from ._images import (
    load_images as load_images,
)
from ._sentencepiece import SentencePieceTokenizer as SentencePieceTokenizer
from ._stream import (
    AbstractStream as AbstractStream,
)
from ._stream import (
    Batch as Batch,
)
from ._stream import (
    TokenStream as TokenStream,
)
from ._stream import (
    pack_documents as pack_documents,
)
