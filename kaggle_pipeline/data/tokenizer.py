"""Gemma's SentencePiece tokenizer, loaded from a `tokenizer.model` or rebuilt from a GGUF.

A GGUF carries the vocabulary as metadata (`tokenizer.ggml.*`), not the SentencePiece model, so
`Tokenizer.from_gguf` rebuilds an equivalent `ModelProto`. llama.cpp's converter changed a few
things on the way in, which are undone here:

* pieces that SentencePiece keeps as USER_DEFINED (`<start_of_turn>`, `<unused0>`, ...) are
  written as CONTROL; only pad/eos/bos are control in the official model and unk is UNKNOWN;
* user-defined whitespace pieces are spelled with real spaces, SentencePiece wants U+2581;
* the normalizer is not stored: Gemma's is the identity with spaces escaped to U+2581, no dummy
  prefix and no folding of repeated whitespace (what Hugging Face's `GemmaTokenizer` does too).

The result tokenizes like the official Gemma 3 `tokenizer.model` (BPE ordered by score, byte
fallback). `encode` additionally turns the literal text of the control pieces (`<bos>`,
`<eos>`, `<pad>`, `<unk>`) into their ids, as Hugging Face does, so a rendered chat string that
starts with `<bos>` encodes to the same ids as the conversation built id by id.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as sp_pb2

from kaggle_pipeline.checkpoints.gguf_header import read_header
from kaggle_pipeline.files import write_atomically

_Piece = sp_pb2.ModelProto.SentencePiece
_SPACE = "\u2581"  # how SentencePiece spells a space inside a piece

# llama.cpp's token types (gguf.TokenType); UNKNOWN (2) is not trusted, the unk id decides.
_GGUF_NORMAL, _GGUF_CONTROL, _GGUF_USER_DEFINED, _GGUF_UNUSED, _GGUF_BYTE = 1, 3, 4, 5, 6


class Tokenizer:
    """A SentencePiece processor plus the special ids the pipeline needs."""

    def __init__(self, model: sp_pb2.ModelProto, *, source: str = "<memory>"):
        self._source = source
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(model.SerializeToString())
        except (RuntimeError, OSError) as err:
            raise ValueError(f"{source}: not a usable SentencePiece model ({err})") from err
        # Control and unknown pieces are invisible to SentencePiece's encoder; find their literal
        # text ourselves so `encode` can map e.g. "<bos>" typed in a template to its id.
        specials = [
            piece.piece for piece in model.pieces if piece.type in (_Piece.CONTROL, _Piece.UNKNOWN)
        ]
        specials.sort(key=len, reverse=True)  # longest first, so the regex prefers whole pieces
        self._special_ids = {text: self._sp.PieceToId(text) for text in specials}
        self._special_split = (
            re.compile("(" + "|".join(map(re.escape, specials)) + ")") if specials else None
        )

    # -- constructors -----------------------------------------------------------------------

    @classmethod
    def from_model_file(cls, path: str | os.PathLike) -> Tokenizer:
        """Load a SentencePiece `.model` file, e.g. the official Gemma `tokenizer.model`."""
        path = _existing_file(path)
        data = path.read_bytes()
        if data[:4] == b"GGUF":
            raise ValueError(f"{path}: is a GGUF file, load it with Tokenizer.from_gguf")
        return cls(_parse_model_proto(data, str(path)), source=str(path))

    @classmethod
    def from_serialized(cls, data: bytes, *, source: str = "<serialized tokenizer>") -> Tokenizer:
        """Load the bytes `serialized()` returned (a SentencePiece ModelProto)."""
        return cls(_parse_model_proto(data, source), source=source)

    @classmethod
    def from_gguf(cls, path: str | os.PathLike) -> Tokenizer:
        """Rebuild the SentencePiece model from the vocabulary embedded in a GGUF file."""
        path = _existing_file(path)
        metadata = _read_gguf_tokenizer_metadata(path)
        return cls(_model_proto_from_gguf(metadata, str(path)), source=str(path))

    def serialized(self) -> bytes:
        """The SentencePiece ModelProto, to store next to a checkpoint."""
        return self._sp.serialized_model_proto()

    def save(self, path: str | os.PathLike) -> None:
        """Write `serialized()` to `path` atomically (a loadable `tokenizer.model`)."""
        write_atomically(path, lambda tmp: tmp.write_bytes(self.serialized()))

    # -- encoding ---------------------------------------------------------------------------

    def encode(self, text: str, *, add_bos: bool = False) -> list[int]:
        """Token ids of `text`; the text of control pieces such as `<bos>` becomes their id."""
        ids = [self.bos_id] if add_bos else []
        if self._special_split is None:
            return ids + self._sp.EncodeAsIds(text)
        for chunk in self._special_split.split(text):
            if not chunk:
                continue
            special = self._special_ids.get(chunk)
            if special is not None:
                ids.append(special)
            else:
                ids.extend(self._sp.EncodeAsIds(chunk))
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; pad/eos/bos are dropped, as SentencePiece does with control pieces."""
        return self._sp.DecodeIds([int(i) for i in ids])

    def id_to_piece(self, token_id: int) -> str:
        return self._sp.IdToPiece(int(token_id))

    def piece_to_id(self, piece: str) -> int:
        """Id of a vocabulary piece (spelled with U+2581 for spaces); KeyError if absent."""
        token_id = self._sp.PieceToId(piece)
        if token_id == self._sp.unk_id() and piece != self._sp.IdToPiece(token_id):
            raise KeyError(f"{self._source}: piece {piece!r} is not in the vocabulary")
        return token_id

    # -- vocabulary facts -------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self._sp.GetPieceSize()

    @property
    def pad_id(self) -> int:
        return self._required_id("pad", self._sp.pad_id())

    @property
    def eos_id(self) -> int:
        return self._required_id("eos", self._sp.eos_id())

    @property
    def bos_id(self) -> int:
        return self._required_id("bos", self._sp.bos_id())

    @property
    def unk_id(self) -> int:
        return self._required_id("unk", self._sp.unk_id())

    @property
    def start_of_turn_id(self) -> int:
        return self.piece_to_id("<start_of_turn>")  # 106 in Gemma 2, 105 in Gemma 3

    @property
    def end_of_turn_id(self) -> int:
        return self.piece_to_id("<end_of_turn>")  # 107 in Gemma 2, 106 in Gemma 3

    def _required_id(self, name: str, token_id: int) -> int:
        if token_id < 0:
            raise KeyError(f"{self._source}: the tokenizer defines no {name} token")
        return token_id

    def __repr__(self) -> str:
        return f"Tokenizer(source={self._source!r}, vocab_size={self.vocab_size})"


# -- SentencePiece model files ----------------------------------------------------------------


def _existing_file(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: tokenizer file not found")
    if not path.is_file():
        raise ValueError(f"{path}: is not a file")
    return path


def _parse_model_proto(data: bytes, source: str) -> sp_pb2.ModelProto:
    model = sp_pb2.ModelProto()
    try:
        model.ParseFromString(data)
    except Exception as err:  # protobuf raises its own DecodeError
        raise ValueError(f"{source}: not a SentencePiece model ({err})") from err
    # Arbitrary bytes can parse as a ModelProto with unknown fields; a tokenizer has pieces.
    if len(model.pieces) == 0:
        raise ValueError(f"{source}: not a SentencePiece model (it holds no vocabulary pieces)")
    return model


# -- GGUF -------------------------------------------------------------------------------------

_GGUF_TOKENIZER_KEYS = (
    "tokenizer.ggml.model",
    "tokenizer.ggml.tokens",
    "tokenizer.ggml.scores",
    "tokenizer.ggml.token_type",
    "tokenizer.ggml.bos_token_id",
    "tokenizer.ggml.eos_token_id",
    "tokenizer.ggml.unknown_token_id",
    "tokenizer.ggml.padding_token_id",
    "tokenizer.ggml.add_space_prefix",
)


def _read_gguf_tokenizer_metadata(path: Path) -> dict:
    """The `tokenizer.ggml.*` metadata of a GGUF (HeaderError, a ValueError, if unreadable)."""
    header = read_header(path, string_arrays=("tokenizer.ggml.tokens",), tensors=False)
    return {k: v for k, v in header.metadata.items() if k in _GGUF_TOKENIZER_KEYS}


def _model_proto_from_gguf(metadata: dict, source: str) -> sp_pb2.ModelProto:
    """An equivalent SentencePiece BPE model for a GGUF's `llama` (SentencePiece) vocabulary."""
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type"):
        if key not in metadata:
            raise ValueError(f"{source}: GGUF has no tokenizer vocabulary (missing {key})")
    kind = metadata.get("tokenizer.ggml.model")
    if kind != "llama":
        raise ValueError(
            f"{source}: tokenizer.ggml.model is {kind!r}; only SentencePiece vocabularies "
            "('llama', as Gemma uses) can be rebuilt"
        )
    tokens = metadata["tokenizer.ggml.tokens"]
    types = metadata["tokenizer.ggml.token_type"]
    scores = metadata.get("tokenizer.ggml.scores")
    if scores is None:  # BPE merge priority follows vocabulary order
        scores = -np.arange(len(tokens), dtype=np.float32)
    if not len(tokens) == len(types) == len(scores):
        raise ValueError(
            f"{source}: tokenizer.ggml.tokens/scores/token_type have different lengths "
            f"({len(tokens)}, {len(scores)}, {len(types)})"
        )

    def special_id(key: str) -> int:
        token_id = metadata.get(key)
        if token_id is None or not 0 <= int(token_id) < len(tokens):
            raise ValueError(f"{source}: field {key} is missing or out of range ({token_id})")
        return int(token_id)

    bos_id = special_id("tokenizer.ggml.bos_token_id")
    eos_id = special_id("tokenizer.ggml.eos_token_id")
    unk_id = special_id("tokenizer.ggml.unknown_token_id")
    pad_id = metadata.get("tokenizer.ggml.padding_token_id")
    pad_id = -1 if pad_id is None else special_id("tokenizer.ggml.padding_token_id")
    control_ids = {bos_id, eos_id, pad_id}

    model = sp_pb2.ModelProto()
    pieces = []
    for token_id, (token, token_type, score) in enumerate(
        zip(tokens, types.tolist(), scores.tolist(), strict=True)
    ):
        if token_id == unk_id:
            piece_type = _Piece.UNKNOWN
        elif token_type == _GGUF_CONTROL:
            # Only pad/eos/bos stay control; SentencePiece has <start_of_turn> and the other
            # markers as user-defined, which is what makes them match when typed in text.
            piece_type = _Piece.CONTROL if token_id in control_ids else _Piece.USER_DEFINED
        elif token_type == _GGUF_USER_DEFINED:
            piece_type = _Piece.USER_DEFINED
            token = token.replace(" ", _SPACE)  # llama.cpp un-escaped these
        elif token_type == _GGUF_BYTE or re.fullmatch(r"<0x[0-9A-F]{2}>", token):
            piece_type = _Piece.BYTE
        elif token_type == _GGUF_UNUSED:
            piece_type = _Piece.UNUSED
        elif token_type == _GGUF_NORMAL:
            piece_type = _Piece.NORMAL
        else:
            raise ValueError(
                f"{source}: tokenizer.ggml.token_type[{token_id}] is {token_type}, "
                "not a SentencePiece piece type"
            )
        pieces.append(_Piece(piece=token, score=score, type=piece_type))
    model.pieces.extend(pieces)

    trainer = model.trainer_spec
    trainer.model_type = sp_pb2.TrainerSpec.BPE
    trainer.vocab_size = len(tokens)
    trainer.byte_fallback = True
    trainer.split_digits = True
    trainer.allow_whitespace_only_pieces = True
    trainer.unk_id, trainer.bos_id, trainer.eos_id, trainer.pad_id = unk_id, bos_id, eos_id, pad_id
    trainer.unk_piece, trainer.bos_piece, trainer.eos_piece = (
        tokens[unk_id], tokens[bos_id], tokens[eos_id],
    )
    if pad_id >= 0:
        trainer.pad_piece = tokens[pad_id]

    normalizer = model.normalizer_spec
    normalizer.name = "identity"
    # llama.cpp assumes a dummy prefix when the key is absent; Gemma files say False.
    normalizer.add_dummy_prefix = bool(metadata.get("tokenizer.ggml.add_space_prefix", True))
    normalizer.remove_extra_whitespaces = False
    normalizer.escape_whitespaces = True
    return model
