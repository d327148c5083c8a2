"""smollm2/tokenizer.py: text cut at every SAFE_CUT and encoded segment by segment (SegmentEncoder)
gives exactly the ids of encoding the whole text, on every kind of space, script and special token."""
import random

import numpy as np
import pytest

from smollm2 import documents
from smollm2.tokenizer import SegmentEncoder, load_tokenizer
from test_documents import write


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


def test_cuts_and_segments_never_change_tokens_on_tricky_text(tmp_path, tokenizer):
    # every kind of space the regexes might disagree on, CRLF, contractions, non-Latin words,
    # emoji and special tokens, cut into pieces as small as one byte
    alphabet = list("ab Z9'.,!-\n\t\r\x0b\x0c\x1c\x85\xa0\u1680\u180e\u200b\u2003")
    alphabet += ["\u2028", "\u3000"]
    alphabet += ["\ufeff", "é", "日本", "слово", "'s", " 'll", "🙂", "<|endoftext|>", "12345", "\r\n",
                 "  \n", "\n\n", " der ", "。\n"]
    rng = random.Random(0)
    for trial in range(200):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 300)))
        path = write(tmp_path / f"t{trial}.txt", text)
        expected = tokenizer.encode(text).ids
        for chunk_bytes in (1, 3, 16, 1000):
            pieces = [t for _, t in documents.text_pieces(path, chunk_bytes)]
            assert "".join(pieces) == text
            encode = SegmentEncoder(tokenizer)
            ids = np.frombuffer(b"".join(map(encode, pieces)), dtype=np.uint16).tolist()
            assert ids == expected, (text, chunk_bytes)
