"""Character-level tokenizers for proteins and DNA, and the fast lookup-table encoder the data loader uses.

Every tokenizer is a ``transformers`` fast tokenizer built with the ``tokenizers`` library, so it round-trips through
``save_pretrained`` / ``AutoTokenizer.from_pretrained`` and travels with an exported model. The protein tokenizer
reproduces ESM-2's alphabet id for id (the ``facebook/esm2_*`` checkpoints were trained with it); the nucleotide
tokenizer mirrors its special-token layout (``<pad>`` is 1 in both); the AMPLIFY tokenizer reproduces the 27-token
alphabet of the ``chandar-lab/AMPLIFY_*`` checkpoints (``<pad>`` is 0 there). Each one is named in
:data:`TOKENIZERS` together with what the rest of the data pipeline needs to know about it (the characters the input
policy keeps, the unknown residue, the residues MLM replacements draw from, the default crop), so no other module
compares tokenizer names. Because every regular token is one character, the training loader does not call the
tokenizer per record: :class:`CharTokenEncoder` builds a 256-entry numpy lookup table from the tokenizer's own
vocabulary, which is ~50x faster and gives identical ids (tested).
"""

from __future__ import annotations

import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

TokenizerKind = Literal["protein", "nucleotide", "amplify"]

# ESM-2's alphabet (fair-esm ``Alphabet.from_architecture("ESM-1b")`` == HF ``facebook/esm2_t6_8M_UR50D`` vocab.txt).
# The residue order is by frequency in UniRef, which is why ids are not alphabetical; ``.`` and ``-`` are the
# insertion/gap symbols ESM kept from MSA work, and ``<null_1>`` pads the vocabulary to 33.
PROTEIN_SPECIAL_TOKENS: tuple[str, ...] = ("<cls>", "<pad>", "<eos>", "<unk>")
PROTEIN_RESIDUES = "LAGVSERTIDPKQNFYMHWCXBUZO.-"
PROTEIN_VOCAB: tuple[str, ...] = (*PROTEIN_SPECIAL_TOKENS, *PROTEIN_RESIDUES, "<null_1>", "<mask>")
PROTEIN_MODEL_MAX_LENGTH = 1026  # ESM-2 positions: 1022 residues + <cls> + <eos> (+2 as in the HF checkpoint config)
# The 20 standard amino acids: what the masked-LM "random token" replacement draws from.
PROTEIN_CANONICAL = "LAGVSERTIDPKQNFYMHWC"

# Nucleotides: the same special layout as ESM-2 (<bos> where ESM has <cls>), then <mask>, the four bases, N, and the
# ten remaining IUPAC ambiguity codes. 20 tokens.
NUCLEOTIDE_SPECIAL_TOKENS: tuple[str, ...] = ("<bos>", "<pad>", "<eos>", "<unk>", "<mask>")
NUCLEOTIDE_RESIDUES = "ACGTNRYSWKMBDHV"
NUCLEOTIDE_VOCAB: tuple[str, ...] = (*NUCLEOTIDE_SPECIAL_TOKENS, *NUCLEOTIDE_RESIDUES)
NUCLEOTIDE_CANONICAL = "ACGT"

# AMPLIFY's alphabet (Fournier et al. 2024), 27 tokens, as the released chandar-lab/AMPLIFY_120M and _350M
# checkpoints (vocab_size 27) were trained with: specials, the chain separator "|", the 20 amino acids in ESM's
# frequency order, then "B" at id 26. Source for id 26: chandar-lab/AMPLIFY, framework-integrations/sagemaker/inference/
# code/sm-trained/conf/tokenizer/amplify_vocab.txt (commit fb63336), the 27-line vocabulary its amplify_tokenizer.yaml
# pairs with vocab_size 27 (the training repository's 32-token conf/tokenizer/amplify_vocab.txt puts X B O U Z J at
# 6-11 instead; the released checkpoints are not that layout). X, Z, U, O and J are not tokens: they encode as <unk>.
AMPLIFY_SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<unk>", "<mask>", "<bos>", "<eos>")
AMPLIFY_CHAIN_SEPARATOR = "|"  # joins the chains of a complex (heavy|light antibody pairs); special: never masked
AMPLIFY_RESIDUES = "LAGVSERTIDPKQNFYMHWCB"
AMPLIFY_VOCAB: tuple[str, ...] = (*AMPLIFY_SPECIAL_TOKENS, AMPLIFY_CHAIN_SEPARATOR, *AMPLIFY_RESIDUES)
AMPLIFY_MODEL_MAX_LENGTH = 2048  # AMPLIFY's max_length: positions 0..2047, <bos> and <eos> included

# What the input policy maps an out-of-alphabet character to, per kind ("unknown residue" in each alphabet). AMPLIFY
# has no X token: the mapped X then encodes as <unk>, which is what its tokenizer gives any unknown character.
UNKNOWN_RESIDUE: dict[str, str] = {"protein": "X", "nucleotide": "N", "amplify": "X"}


class _PortableTokenizerFast(PreTrainedTokenizerFast):
    """``PreTrainedTokenizerFast`` that saves ``"tokenizer_class": "PreTrainedTokenizerFast"`` in every version.

    ``save_pretrained`` writes ``type(self).__name__``; in transformers 5 the fast class is ``TokenizersBackend``
    (``PreTrainedTokenizerFast`` is an alias of it), a name transformers 4.x cannot resolve, so a tokenizer saved
    with an exported model on a v5 machine would not load on a v4.56 one. ``PreTrainedTokenizerFast`` resolves
    in both (tested for v5). The class adds no behaviour; only its name is pinned.
    """


# Only __name__ (what save_pretrained writes); __qualname__ stays, so pickle still finds the class in this module.
_PortableTokenizerFast.__name__ = "PreTrainedTokenizerFast"


def _char_level_tokenizer(
    vocab: Sequence[str],
    special_tokens: Sequence[str],
    bos: str,
    eos: str,
    model_max_length: int,
    **special_kwargs: str | list[str],
) -> PreTrainedTokenizerFast:
    """One token per character; whitespace dropped and lower case upper-cased by the normalizer; ``bos … eos``."""
    ids = {token: i for i, token in enumerate(vocab)}
    tok = Tokenizer(models.WordLevel(ids, unk_token="<unk>"))
    # Whitespace is dropped (ESM's tokenizer splits on it, so "M K V" == "MKV"), and lower case is upper-cased:
    # ESM's own tokenizer maps "mkv" to <unk> <unk> <unk>, which is never what a caller means. The tokenizers library
    # has no Uppercase normalizer, hence one Replace per letter (26 tiny rules, cost negligible).
    tok.normalizer = normalizers.Sequence(
        [normalizers.Replace(Regex(r"\s"), "")] + [normalizers.Replace(c, c.upper()) for c in string.ascii_lowercase]
    )
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}",
        pair=f"{bos} $A {eos} $B:1 {eos}:1",  # as ESM's build_inputs_with_special_tokens
        special_tokens=[(bos, ids[bos]), (eos, ids[eos])],
    )
    tok.decoder = decoders.Fuse()  # "M","K","V" -> "MKV", no spaces
    # Special tokens are matched before normalisation, so "<mask>" in a string is one token, never "<MASK>".
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in special_tokens])
    return _PortableTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        eos_token=eos,
        mask_token="<mask>",
        model_max_length=model_max_length,
        **special_kwargs,
    )


def protein_tokenizer() -> PreTrainedTokenizerFast:
    """ESM-2's protein tokenizer: 33 tokens with ESM-2's exact ids, ``<cls> … <eos>`` around each sequence.

    ``<cls>``=0, ``<pad>``=1, ``<eos>``=2, ``<unk>``=3, ``L A G V S E R T I D P K Q N F Y M H W C X B U Z O . -``
    = 4…30, ``<null_1>``=31, ``<mask>``=32; ``model_max_length`` 1026. Lower-case input is upper-cased and
    whitespace ignored (ESM's tokenizer gives ``<unk>`` for lower case; ids are otherwise identical).
    """
    return _char_level_tokenizer(
        PROTEIN_VOCAB,
        special_tokens=(*PROTEIN_SPECIAL_TOKENS, "<null_1>", "<mask>"),
        bos="<cls>",
        eos="<eos>",
        model_max_length=PROTEIN_MODEL_MAX_LENGTH,
        cls_token="<cls>",
    )


def nucleotide_tokenizer(model_max_length: int = 8192) -> PreTrainedTokenizerFast:
    """Character-level DNA tokenizer: 20 tokens, ``<bos> … <eos>`` around each sequence.

    ``<bos>``=0, ``<pad>``=1, ``<eos>``=2, ``<unk>``=3, ``<mask>``=4, ``A C G T N`` = 5…9 and the IUPAC codes
    ``R Y S W K M B D H V`` = 10…19. Any case is accepted (upper-cased by the normalizer). Set a causal model's
    ``vocab_size`` to ``len(tokenizer)`` (20).
    """
    return _char_level_tokenizer(
        NUCLEOTIDE_VOCAB,
        special_tokens=NUCLEOTIDE_SPECIAL_TOKENS,
        bos="<bos>",
        eos="<eos>",
        model_max_length=model_max_length,
        bos_token="<bos>",
    )


def amplify_tokenizer() -> PreTrainedTokenizerFast:
    """AMPLIFY's protein tokenizer: 27 tokens with the ids of the ``chandar-lab/AMPLIFY_*`` checkpoints.

    ``<pad>``=0, ``<unk>``=1, ``<mask>``=2, ``<bos>``=3, ``<eos>``=4, ``|``=5 (chain separator), then
    ``L A G V S E R T I D P K Q N F Y M H W C`` = 6…25 and ``B`` = 26; each sequence is ``<bos> residues <eos>``;
    ``model_max_length`` 2048. Lower case is upper-cased and whitespace ignored; X, Z, U, O, J and any other character
    become ``<unk>``. ``|`` is a special token (matched anywhere, never masked, dropped by
    ``decode(skip_special_tokens=True)``).
    """
    return _char_level_tokenizer(
        AMPLIFY_VOCAB,
        special_tokens=(*AMPLIFY_SPECIAL_TOKENS, AMPLIFY_CHAIN_SEPARATOR),
        bos="<bos>",
        eos="<eos>",
        model_max_length=AMPLIFY_MODEL_MAX_LENGTH,
        bos_token="<bos>",
        additional_special_tokens=[AMPLIFY_CHAIN_SEPARATOR],
    )


@dataclass(frozen=True)
class TokenizerSpec:
    """What the data pipeline needs to know about one named bioscale tokenizer (an entry of :data:`TOKENIZERS`).

    Attributes:
        build: returns the tokenizer.
        vocab: its tokens in id order (recognises a tokenizer saved from it).
        policy_alphabet: the characters the input policy keeps as they are (after upper-casing).
        unknown_residue: what the policy maps any other character to (``unknown_residues="map"``).
        canonical: the residues the masked-LM random replacements draw from.
        crop: records longer than the context: one ``"random"`` crop (proteins) or strided ``"window"`` pieces (genomes).
    """

    build: Callable[[], PreTrainedTokenizerFast]
    vocab: tuple[str, ...]
    policy_alphabet: str
    unknown_residue: str
    canonical: str
    crop: str


TOKENIZERS: dict[str, TokenizerSpec] = {
    "protein": TokenizerSpec(protein_tokenizer, PROTEIN_VOCAB, PROTEIN_RESIDUES, UNKNOWN_RESIDUE["protein"],
                             PROTEIN_CANONICAL, "random"),
    "nucleotide": TokenizerSpec(nucleotide_tokenizer, NUCLEOTIDE_VOCAB, NUCLEOTIDE_RESIDUES,
                                UNKNOWN_RESIDUE["nucleotide"], NUCLEOTIDE_CANONICAL, "window"),
    # AMPLIFY was trained on randomly truncated sequences; "|" passes the policy (multi-chain records).
    "amplify": TokenizerSpec(amplify_tokenizer, AMPLIFY_VOCAB, AMPLIFY_RESIDUES + AMPLIFY_CHAIN_SEPARATOR,
                             UNKNOWN_RESIDUE["amplify"], PROTEIN_CANONICAL, "random"),
}  # fmt: skip


def tokenizer_spec(kind: str) -> TokenizerSpec:
    """The :class:`TokenizerSpec` named ``kind``; ``ValueError`` listing the names."""
    if kind not in TOKENIZERS:
        raise ValueError(f"unknown tokenizer {kind!r}: expected one of {', '.join(map(repr, TOKENIZERS))}")
    return TOKENIZERS[kind]


def get_tokenizer(kind: str) -> PreTrainedTokenizerFast:
    """The bioscale tokenizer named ``kind`` (``"protein"``, ``"nucleotide"`` or ``"amplify"``)."""
    return tokenizer_spec(kind).build()


def canonical_token_ids(tokenizer: PreTrainedTokenizerBase, kind: str | None = None) -> list[int]:
    """Ids the masked-LM collator draws its 10% random replacements from.

    For the bioscale tokenizers these are the canonical residues (20 amino acids, or ACGT), so a random replacement
    never injects rare symbols (``O``, ``-``, IUPAC codes, AMPLIFY's ``B``) the model would otherwise learn to predict
    from noise. ``kind`` (a :data:`TOKENIZERS` name) is recognised from the vocabulary when not given. For any other
    tokenizer: every token that is neither special nor ``<…>``-shaped (ESM's ``<null_1>``).
    """
    vocab = tokenizer.get_vocab()
    if kind is None:
        kind = next((k for k, spec in TOKENIZERS.items() if vocab == {t: i for i, t in enumerate(spec.vocab)}), None)
    alphabet = TOKENIZERS[kind].canonical if kind in TOKENIZERS else ""
    if alphabet and all(c in vocab for c in alphabet):
        return sorted(vocab[c] for c in alphabet)
    special = set(tokenizer.all_special_ids)
    return sorted(i for t, i in vocab.items() if i not in special and not (t.startswith("<") and t.endswith(">")))


class CharTokenEncoder:
    """Encodes clean ASCII sequences with a 256-entry lookup table built from a character-level tokenizer.

    ``encode(seq)`` equals ``tokenizer(seq)["input_ids"]`` (special tokens included) for any string without
    whitespace (which the tokenizer drops and this maps to ``<unk>``), lower case and non-ASCII included; it returns ``uint8`` ids (every vocabulary here has < 256 tokens), which keeps
    shuffle buffers small. Pickles cheaply, so it crosses into data-loader workers instead of the tokenizer.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        vocab = tokenizer.get_vocab()
        if len(vocab) > 256:
            raise ValueError(f"CharTokenEncoder needs a vocabulary of at most 256 tokens, got {len(vocab)}")
        special = set(tokenizer.all_special_tokens)
        regular = {tok: i for tok, i in vocab.items() if tok not in special and not tok.startswith("<")}
        # One-character special tokens (AMPLIFY's chain separator "|") are matched anywhere in a string by the
        # tokenizer, so the table maps their character too; they are not probed below.
        single_special = {tok: i for tok, i in vocab.items() if tok in special and len(tok) == 1}
        long_tokens = [tok for tok in regular if len(tok) != 1]
        if long_tokens:
            raise ValueError(
                f"CharTokenEncoder needs a character-level tokenizer; vocabulary has multi-character tokens "
                f"{long_tokens[:5]}"
            )
        if tokenizer.unk_token_id is None:
            raise ValueError("CharTokenEncoder needs a tokenizer with an unk token")
        lut = np.full(256, tokenizer.unk_token_id, dtype=np.uint8)
        for tok, i in regular.items():
            if ord(tok) < 128:
                lut[ord(tok)] = i
                lut[ord(tok.lower())] = i  # the tokenizer's normalizer upper-cases
        for tok, i in single_special.items():
            if ord(tok) < 128:
                lut[ord(tok)] = i  # special tokens are matched before normalisation: no lower-case twin
        self.lut = lut
        # Special tokens the tokenizer wraps a sequence in, found by encoding one residue with and without them.
        probe = next(iter(regular))
        core = tokenizer(probe, add_special_tokens=False)["input_ids"]
        full = tokenizer(probe, add_special_tokens=True)["input_ids"]
        assert len(core) == 1 and core[0] in full, (core, full)
        at = full.index(core[0])
        self.prefix = np.asarray(full[:at], dtype=np.uint8)
        self.suffix = np.asarray(full[at + 1 :], dtype=np.uint8)
        self.num_special = len(self.prefix) + len(self.suffix)

    def encode(self, seq: str) -> np.ndarray:
        """``uint8`` ids of ``seq`` with the tokenizer's special tokens around it."""
        # A non-ASCII character becomes one '?' and so one <unk>, as the tokenizer gives it.
        body = self.lut[np.frombuffer(seq.encode("ascii", errors="replace"), dtype=np.uint8)]
        return np.concatenate([self.prefix, body, self.suffix])
