"""SmolLM2's tokenizer: where it lives (tokenizer/ at the repo's top, the one constant for it), how to
load it, where text can be cut without changing its tokens, and an encoder that uses those cuts."""
import os
import re

import numpy as np
from tokenizers import Tokenizer

from smollm2.errors import DataError

TOKENIZER_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tokenizer")
EOT_ID = 0  # <|endoftext|>: between documents, and the base model's BOS and EOS
SEGMENT_CACHE = 1_000_000  # distinct segments remembered (~150 MB) before it starts over
# Safe cut: before a single " " or "\n" between two non-space characters. The byte-level
# pre-tokeniser's regex never joins a non-space character to the whitespace after it, and a lone
# space or newline before a non-space starts a pre-token of its own (" word", "\n"), so every
# pre-token, and hence every token, comes out the same as from the whole text. Python's \s covers
# every character the tokenizer's regex counts as space (and a few more), so \S is safe here.
# Checked for every Unicode character on both sides (tokenizers 0.23); tests fuzz it too.
SAFE_CUT = re.compile(r"(?<=\S)(?=[ \n]\S)")


def tokenizer_file(path=TOKENIZER_DIR):
    """The tokenizer.json at path, or in the directory path; a DataError if there is none."""
    file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise DataError(f"tokenizer not found: {file} (expected a tokenizer.json or its directory)")
    return file


def load_tokenizer(path=TOKENIZER_DIR):
    """The tokenizer from a tokenizer.json file or a directory holding one."""
    return Tokenizer.from_file(tokenizer_file(path))


class SegmentEncoder:
    """Encodes text cut at every SAFE_CUT into short segments (" the", " Citizen:", "\\nAll"), each
    distinct one only once, as uint16 bytes. Text repeats its segments, so this is several times
    faster than handing the tokenizer whole pieces (and it gets slower per MB on long strings)."""

    def __init__(self, tokenizer):
        # encode_batch_fast skips offsets we do not need; tokenizers < 0.20 lacks it
        self.encode_batch = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
        self.cache = {}  # segment -> its ids as uint16 bytes

    def __call__(self, text):
        segments = SAFE_CUT.split(text)
        if len(self.cache) > SEGMENT_CACHE:
            self.cache.clear()
        new = list(set(segments).difference(self.cache))  # any order: each is encoded alone
        for segment, enc in zip(new, self.encode_batch(new, add_special_tokens=False)):
            self.cache[segment] = np.array(enc.ids, dtype=np.uint16).tobytes()
        ids = b"".join(map(self.cache.__getitem__, segments))
        for segment in new:
            if len(segment) > 100:  # long ones (text without spaces) rarely repeat: keep RAM low
                del self.cache[segment]
        return ids
