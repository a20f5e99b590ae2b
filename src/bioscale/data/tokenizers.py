"""Character-level tokenizers for proteins and DNA, and the fast lookup-table encoder the data loader uses.

Every tokenizer is a ``transformers`` fast tokenizer built with the ``tokenizers`` library, so it round-trips through
``save_pretrained`` / ``AutoTokenizer.from_pretrained`` and travels with an exported model. The protein tokenizer
reproduces ESM-2's alphabet id for id (the ``facebook/esm2_*`` checkpoints were trained with it); the compact
nucleotide tokenizer mirrors its special-token layout (``<pad>`` is 1 in both); the byte-level ``nucleotide_ascii``
tokenizer reproduces the reference's (NVIDIA bionemo-recipes Llama 3 genomic checkpoints: every character its ASCII
code, ``<EOS>`` 0, ``<PAD>`` 1, ``<BOS>`` 2, ``<UNK>`` 3, case kept); the AMPLIFY tokenizer reproduces the 27-token
alphabet of the ``chandar-lab/AMPLIFY_*`` checkpoints (``<pad>`` is 0 there). Each one is named in
:data:`TOKENIZERS` together with what the rest of the data pipeline needs to know about it (the characters the input
policy keeps, the unknown residue, the residues MLM replacements draw from, the default crop), so no other module
compares tokenizer names. Because every regular token is one character, the training loader does not call the
tokenizer per record: :class:`CharTokenEncoder` builds a 256-entry numpy lookup table from the tokenizer's own
vocabulary, which is ~50x faster and gives identical ids (tested).

Which call adds special tokens. ``tokenizer(text)`` (``add_special_tokens=True``, the default) puts the start token
before the text; the protein, AMPLIFY and codon tokenizers also put ``<eos>`` / ``<SEP>`` after it, as their models
were trained. The two DNA tokenizers, whose models are causal, do *not*: ``tokenizer(prompt)`` is ``<bos>`` + the
bases, so ``model.generate(**tokenizer(prompt, return_tensors="pt"))`` continues the prompt instead of starting after
an end-of-sequence token (the reference tokenizer appends ``<EOS>`` to every encoding; that is the one place the
``nucleotide_ascii`` tokenizer differs from it, ids unchanged). Training records still end with ``<eos>``: the data
pipeline appends it (:func:`record_affixes`, ``TokenizerSpec.record_eos``), so a causal model learns where a
sequence stops.
"""

from __future__ import annotations

import itertools
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

TokenizerKind = Literal["protein", "nucleotide", "nucleotide_ascii", "amplify", "codon"]

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
# N and the IUPAC ambiguity codes: positions a causal DNA model can be told not to predict (CLMCollator).
NUCLEOTIDE_AMBIGUOUS = "NRYSWKMBDHV"

# The reference's byte-level nucleotide vocabulary (NVIDIA bionemo-recipes, models/llama3/create_tokenizer.py; its
# Llama 3 genomic checkpoints have vocab_size 256, bos 2, eos 0, pad 1): ids 0-3 are <EOS> <PAD> <BOS> <UNK>, every
# other id i is the character chr(i), so A C G T = 65 67 71 84 and the soft-masked a c g t = 97 99 103 116. No
# normaliser: case is kept, and lower-case bases are their own tokens. No <mask>: causal LM only.
NUCLEOTIDE_ASCII_SPECIAL_TOKENS: tuple[str, ...] = ("<EOS>", "<PAD>", "<BOS>", "<UNK>")
NUCLEOTIDE_ASCII_VOCAB: tuple[str, ...] = (*NUCLEOTIDE_ASCII_SPECIAL_TOKENS, *(chr(i) for i in range(4, 256)))

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

# CodonFM's 69-token codon vocabulary (the released nvidia/NV-CodonFM-Encodon-* checkpoints' CodonTokenizer): five
# specials, then the 64 codons in itertools.product("ACGT", repeat=3) order, AAA = 5 ... TTT = 68. One token per codon,
# read from the first base; each sequence is <CLS> codons <SEP>.
CODON_SPECIAL_TOKENS: tuple[str, ...] = ("<CLS>", "<SEP>", "<UNK>", "<PAD>", "<MASK>")
CODON_BASES = "ACGT"
CODONS: tuple[str, ...] = tuple("".join(c) for c in itertools.product(CODON_BASES, repeat=3))
CODON_VOCAB: tuple[str, ...] = (*CODON_SPECIAL_TOKENS, *CODONS)
CODON_MODEL_MAX_LENGTH = 2048  # EnCodon's max_position_embeddings: codons plus <CLS> and <SEP>

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
    *,
    eos_after_text: bool = True,
    **special_kwargs: str | list[str],
) -> PreTrainedTokenizerFast:
    """One token per character; whitespace dropped and lower case upper-cased by the normalizer; ``bos … eos``
    (``bos …`` only with ``eos_after_text=False``: the causal tokenizers, see the module docstring)."""
    ids = {token: i for i, token in enumerate(vocab)}
    tok = Tokenizer(models.WordLevel(ids, unk_token="<unk>"))
    # Whitespace is dropped (ESM's tokenizer splits on it, so "M K V" == "MKV"), and lower case is upper-cased:
    # ESM's own tokenizer maps "mkv" to <unk> <unk> <unk>, which is never what a caller means. The tokenizers library
    # has no Uppercase normalizer, hence one Replace per letter (26 tiny rules, cost negligible).
    tok.normalizer = normalizers.Sequence(
        [normalizers.Replace(Regex(r"\s"), "")] + [normalizers.Replace(c, c.upper()) for c in string.ascii_lowercase]
    )
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    if eos_after_text:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A {eos}",
            pair=f"{bos} $A {eos} $B:1 {eos}:1",  # as ESM's build_inputs_with_special_tokens
            special_tokens=[(bos, ids[bos]), (eos, ids[eos])],
        )
    else:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A $B:1", special_tokens=[(bos, ids[bos])]
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
    """bioscale's compact character-level DNA tokenizer: 20 tokens, ``<bos>`` before each sequence.

    ``<bos>``=0, ``<pad>``=1, ``<eos>``=2, ``<unk>``=3, ``<mask>``=4, ``A C G T N`` = 5…9 and the IUPAC codes
    ``R Y S W K M B D H V`` = 10…19. Any case is accepted (upper-cased by the normalizer). ``tokenizer(text)`` is
    ``<bos>`` + the bases, no ``<eos>`` (a prompt stays open; training records get theirs from the data pipeline, see
    the module docstring). Set a causal model's ``vocab_size`` to ``len(tokenizer)`` (20). For checkpoints of the
    reference's genomic Llama 3 models use :func:`nucleotide_ascii_tokenizer`.
    """
    return _char_level_tokenizer(
        NUCLEOTIDE_VOCAB,
        special_tokens=NUCLEOTIDE_SPECIAL_TOKENS,
        bos="<bos>",
        eos="<eos>",
        model_max_length=model_max_length,
        eos_after_text=False,
        bos_token="<bos>",
    )


def nucleotide_ascii_tokenizer(model_max_length: int = 8192) -> PreTrainedTokenizerFast:
    """The reference's byte-level DNA tokenizer: 256 tokens, every character its ASCII code, case kept.

    ``<EOS>``=0, ``<PAD>``=1, ``<BOS>``=2, ``<UNK>``=3, then ``chr(i)`` = i for i in 4…255: ``A C G T N`` = 65 67 71
    84 78, soft-masked ``a c g t`` = 97 99 103 116, IUPAC codes likewise; characters above U+00FF are ``<UNK>``. The
    ids, vocabulary, special tokens and pre-tokenizer equal those of the tokenizer the reference's Llama 3 genomic
    checkpoints (``vocab_size`` 256, ``bos_token_id`` 2, ``eos_token_id`` 0, ``pad_token_id`` 1) were trained with
    (NVIDIA bionemo-recipes ``create_nucleotide_tokenizer``), so those checkpoints load and generate with it. One
    difference, on purpose: ``tokenizer(text)`` is ``<BOS>`` + the characters, without the reference's trailing
    ``<EOS>`` (module docstring). No ``<mask>``: causal LM only. Lower-case (soft-masked repeat) bases are their own
    ids, which is what those checkpoints saw in training; ``data.keep_case`` keeps them (``bioscale.data.policy``).
    """
    ids = {token: i for i, token in enumerate(NUCLEOTIDE_ASCII_VOCAB)}
    tok = Tokenizer(models.WordLevel(ids, unk_token="<UNK>"))
    # The reference's pre-tokenizer (an empty pattern isolates every character, newline and space included). No
    # normaliser: "a" stays 97.
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.post_processor = processors.TemplateProcessing(
        single="<BOS> $A", pair="<BOS> $A $B:1", special_tokens=[("<BOS>", ids["<BOS>"])]
    )
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in NUCLEOTIDE_ASCII_SPECIAL_TOKENS])
    return _PortableTokenizerFast(
        tokenizer_object=tok,
        bos_token="<BOS>",
        eos_token="<EOS>",
        pad_token="<PAD>",
        unk_token="<UNK>",
        model_max_length=model_max_length,
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


def codon_tokenizer() -> PreTrainedTokenizerFast:
    """CodonFM's codon tokenizer: 69 tokens with the ids of the ``nvidia/NV-CodonFM-Encodon-*`` checkpoints.

    ``<CLS>``=0, ``<SEP>``=1, ``<UNK>``=2, ``<PAD>``=3, ``<MASK>``=4, then the 64 codons ``AAA``=5, ``AAC``=6 …
    ``TTT``=68 (``itertools.product("ACGT", repeat=3)``); each sequence is ``<CLS> codons <SEP>``. Like CodonFM's
    ``CodonTokenizer``, the input is upper-cased, cut into codons from its first base, a trailing partial codon (1-2
    bases) is dropped and a codon that is not ACGT-only (``N``, IUPAC codes) is ``<UNK>``; unlike it, whitespace is
    ignored and ``U`` is read as ``T`` (its RNA mode gives the same ids). The CDS input policy
    (``bioscale.data.cds``) counts all of these before the tokenizer sees a record.
    """
    ids = {token: i for i, token in enumerate(CODON_VOCAB)}
    tok = Tokenizer(models.WordLevel(ids, unk_token="<UNK>"))
    tok.normalizer = normalizers.Sequence(
        [normalizers.Replace(Regex(r"\s"), "")]
        + [normalizers.Replace(c, c.upper()) for c in string.ascii_lowercase]
        + [normalizers.Replace("U", "T")]
    )
    # Keep only whole codons: the matches of ".{3}" (invert=True keeps what the pattern matches and removes the rest,
    # i.e. the trailing 1-2 bases), as the reference tokenizer's range(0, len - 2, 3).
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(".{3}"), behavior="removed", invert=True)
    tok.post_processor = processors.TemplateProcessing(
        single="<CLS> $A <SEP>",
        pair="<CLS> $A <SEP> $B:1 <SEP>:1",
        special_tokens=[("<CLS>", ids["<CLS>"]), ("<SEP>", ids["<SEP>"])],
    )
    tok.decoder = decoders.Fuse()  # "ATG", "GCC" -> "ATGGCC"
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in CODON_SPECIAL_TOKENS])
    return _PortableTokenizerFast(
        tokenizer_object=tok,
        cls_token="<CLS>",
        sep_token="<SEP>",
        unk_token="<UNK>",
        pad_token="<PAD>",
        mask_token="<MASK>",
        model_max_length=CODON_MODEL_MAX_LENGTH,
    )


def _geneformer_v1_tokenizer() -> PreTrainedTokenizerFast:
    # In the function: singlecell imports the input policy, which imports this module.
    from bioscale.data.singlecell import geneformer_tokenizer

    return geneformer_tokenizer(convention="v1")


def _geneformer_v2_tokenizer() -> PreTrainedTokenizerFast:
    from bioscale.data.singlecell import geneformer_tokenizer

    return geneformer_tokenizer(convention="v2")


@dataclass(frozen=True)
class TokenizerSpec:
    """What the data pipeline needs to know about one named bioscale tokenizer (an entry of :data:`TOKENIZERS`).

    Attributes:
        build: returns the tokenizer.
        vocab: its tokens in id order (recognises a tokenizer saved from it).
        policy_alphabet: the characters the input policy keeps as they are (after upper-casing; with
            ``case_sensitive`` and ``data.keep_case`` their lower-case forms too).
        unknown_residue: what the policy maps any other character to (``unknown_residues="map"``).
        canonical: the residues the masked-LM random replacements draw from (for codons: the 64 codons, a tuple).
        crop: records longer than the context: one ``"random"`` crop (proteins) or strided ``"window"`` pieces (genomes).
        unit: what one regular token is: ``"char"`` (a residue or base; :class:`CharTokenEncoder` and
            ``policy.InputPolicy``) or ``"codon"`` (three bases; ``bioscale.data.cds`` encodes and checks those), or
            ``"gene"`` (an Ensembl gene of a rank-value-encoded cell; ``bioscale.data.singlecell``: the records are
            token ids already, the vocabulary is a file, so ``vocab`` is empty).
        record_eos: the data pipeline ends every training record with ``<eos>``, which the tokenizer's own
            post-processor does not add (the causal DNA tokenizers: a prompt stays open, see the module docstring).
        case_sensitive: lower-case letters are tokens of their own (``nucleotide_ascii``); the others upper-case.
    """

    build: Callable[[], PreTrainedTokenizerFast]
    vocab: tuple[str, ...]
    policy_alphabet: str
    unknown_residue: str
    canonical: str | tuple[str, ...]
    crop: str
    unit: str = "char"
    record_eos: bool = False
    case_sensitive: bool = False


TOKENIZERS: dict[str, TokenizerSpec] = {
    "protein": TokenizerSpec(protein_tokenizer, PROTEIN_VOCAB, PROTEIN_RESIDUES, UNKNOWN_RESIDUE["protein"],
                             PROTEIN_CANONICAL, "random"),
    "nucleotide": TokenizerSpec(nucleotide_tokenizer, NUCLEOTIDE_VOCAB, NUCLEOTIDE_RESIDUES,
                                UNKNOWN_RESIDUE["nucleotide"], NUCLEOTIDE_CANONICAL, "window", record_eos=True),
    # The reference's byte-level vocabulary (its Llama 3 genomic checkpoints): same policy alphabet, case kept.
    "nucleotide_ascii": TokenizerSpec(nucleotide_ascii_tokenizer, NUCLEOTIDE_ASCII_VOCAB, NUCLEOTIDE_RESIDUES,
                                      UNKNOWN_RESIDUE["nucleotide"], NUCLEOTIDE_CANONICAL, "window", record_eos=True,
                                      case_sensitive=True),
    # AMPLIFY was trained on randomly truncated sequences; "|" passes the policy (multi-chain records).
    "amplify": TokenizerSpec(amplify_tokenizer, AMPLIFY_VOCAB, AMPLIFY_RESIDUES + AMPLIFY_CHAIN_SEPARATOR,
                             UNKNOWN_RESIDUE["amplify"], PROTEIN_CANONICAL, "random"),
    # Coding sequences (EnCodon): bases ACGT kept, anything else N (its codon is <UNK>); MLM replacements draw from
    # the 64 codons; long CDSs get one random crop of whole codons. Policy and encoder: bioscale.data.cds.
    "codon": TokenizerSpec(codon_tokenizer, CODON_VOCAB, CODON_BASES, "N", CODONS, "random", unit="codon"),
    # Geneformer's gene vocabulary (a file: $BIOSCALE_GENE_VOCAB or the shared geneformer_gene_vocab.txt), V1 and V2
    # conventions. Cells are truncated to their top-ranked genes; MLM replacements draw from the genes only.
    "geneformer": TokenizerSpec(_geneformer_v1_tokenizer, (), "", "", "", "truncate", unit="gene"),
    "geneformer_v2": TokenizerSpec(_geneformer_v2_tokenizer, (), "", "", "", "truncate", unit="gene"),
}  # fmt: skip


def tokenizer_spec(kind: str) -> TokenizerSpec:
    """The :class:`TokenizerSpec` named ``kind``; ``ValueError`` listing the names."""
    if kind not in TOKENIZERS:
        raise ValueError(f"unknown tokenizer {kind!r}: expected one of {', '.join(map(repr, TOKENIZERS))}")
    return TOKENIZERS[kind]


def get_tokenizer(kind: str) -> PreTrainedTokenizerFast:
    """The bioscale tokenizer named ``kind`` (``"protein"``, ``"nucleotide"``, ``"nucleotide_ascii"``, ...)."""
    return tokenizer_spec(kind).build()


def tokenizer_kind(tokenizer: PreTrainedTokenizerBase) -> str | None:
    """The :data:`TOKENIZERS` name whose vocabulary ``tokenizer`` has, id for id (``None``: none of them).

    Recognises a tokenizer saved from a bioscale one, and the reference's own byte-level nucleotide tokenizer."""
    vocab = tokenizer.get_vocab()
    for kind, spec in TOKENIZERS.items():
        if spec.vocab and len(vocab) == len(spec.vocab) and vocab == {t: i for i, t in enumerate(spec.vocab)}:
            return kind
    return None


def token_unit(tokenizer: PreTrainedTokenizerBase) -> int:
    """Characters per regular token: 3 for the codon tokenizer (recognised by its vocabulary), else 1."""
    vocab = tokenizer.get_vocab()
    for spec in TOKENIZERS.values():
        if spec.unit == "codon" and vocab == {token: i for i, token in enumerate(spec.vocab)}:
            return 3
    return 1


def record_affixes(tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], list[int]]:
    """Token ids the data pipeline puts before and after each record: what ``tokenizer`` adds around one character,
    plus ``<eos>`` at the end for a ``record_eos`` tokenizer whose post-processor does not add it.

    ``ValueError`` for a tokenizer that is not character-level.
    """
    vocab = tokenizer.get_vocab()
    special = set(tokenizer.all_special_tokens)
    # The codon tokenizer's regular tokens are three bases: probe with a codon.
    probe = "ATG" if token_unit(tokenizer) == 3 else next((c for c in "ACGTLMK" if c in vocab and c not in special), None)
    if probe is None:
        probe = next((t for t in vocab if len(t) == 1 and t.isalpha() and t not in special), None)
    if probe is None:
        raise ValueError(f"tokenizer {type(tokenizer).__name__} has no one-letter token: not character-level")
    core = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe, add_special_tokens=True)["input_ids"]
    if len(core) != 1 or core[0] not in full:
        raise ValueError(f"tokenizer {type(tokenizer).__name__} is not character-level: {probe!r} -> {core}")
    at = full.index(core[0])
    prefix, suffix = list(full[:at]), list(full[at + 1 :])
    kind = tokenizer_kind(tokenizer)
    eos = tokenizer.eos_token_id
    # A tokenizer saved before the DNA tokenizers stopped appending <eos> still does: never add a second one.
    if kind is not None and TOKENIZERS[kind].record_eos and eos is not None and suffix[-1:] != [eos]:
        suffix.append(eos)
    return prefix, suffix


def canonical_token_ids(tokenizer: PreTrainedTokenizerBase, kind: str | None = None) -> list[int]:
    """Ids the masked-LM collator draws its 10% random replacements from.

    For the bioscale tokenizers these are the canonical residues (20 amino acids, or ACGT), so a random replacement
    never injects rare symbols (``O``, ``-``, IUPAC codes, AMPLIFY's ``B``) the model would otherwise learn to predict
    from noise. ``kind`` (a :data:`TOKENIZERS` name) is recognised from the vocabulary when not given. For any other
    tokenizer: every token that is neither special nor ``<…>``-shaped (ESM's ``<null_1>``).
    """
    vocab = tokenizer.get_vocab()
    if kind is None:
        kind = tokenizer_kind(tokenizer)
    alphabet = TOKENIZERS[kind].canonical if kind in TOKENIZERS else ""
    if alphabet and all(c in vocab for c in alphabet):
        return sorted(vocab[c] for c in alphabet)
    special = set(tokenizer.all_special_ids)
    return sorted(i for t, i in vocab.items() if i not in special and not (t.startswith("<") and t.endswith(">")))


class CharTokenEncoder:
    """Encodes clean ASCII sequences with a 256-entry lookup table built from a character-level tokenizer.

    ``encode(seq)`` equals ``tokenizer(seq)["input_ids"]`` (special tokens included), followed by ``<eos>`` for the
    DNA tokenizers (:func:`record_affixes`), for any string without whitespace (which the compact tokenizers drop and
    this maps to ``<unk>``), lower case and non-ASCII included (a non-ASCII character is one ``<unk>``; the byte-level
    ``nucleotide_ascii`` tokenizer gives U+0080…U+00FF their code instead, which the input policy never lets through:
    it maps them to ``N``). It returns ``uint8`` ids (every vocabulary here has <= 256 tokens), which keeps shuffle
    buffers small. Pickles cheaply, so it crosses into data-loader workers instead of the tokenizer.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        vocab = tokenizer.get_vocab()
        if len(vocab) > 256:
            raise ValueError(f"CharTokenEncoder needs a vocabulary of at most 256 tokens, got {len(vocab)}")
        special = set(tokenizer.all_special_tokens)
        # "<" alone is a character (the byte-level vocabulary has it); "<null_1>"-shaped names are not.
        regular = {tok: i for tok, i in vocab.items() if tok not in special and not (len(tok) > 1 and tok[0] == "<")}
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
        for tok, i in regular.items():
            # A lower-case letter without a token of its own is upper-cased by the tokenizer's normalizer; one with
            # its own token (the byte-level vocabulary) keeps it.
            if ord(tok) < 128 and tok.lower() != tok and tok.lower() not in regular:
                lut[ord(tok.lower())] = i
        for tok, i in single_special.items():
            if ord(tok) < 128:
                lut[ord(tok)] = i  # special tokens are matched before normalisation: no lower-case twin
        self.lut = lut
        # Special tokens around a record: what the tokenizer wraps one residue in (+ <eos> for the DNA tokenizers).
        prefix, suffix = record_affixes(tokenizer)
        self.prefix = np.asarray(prefix, dtype=np.uint8)
        self.suffix = np.asarray(suffix, dtype=np.uint8)
        self.num_special = len(self.prefix) + len(self.suffix)

    def encode(self, seq: str) -> np.ndarray:
        """``uint8`` ids of ``seq`` with the tokenizer's special tokens around it."""
        # A non-ASCII character becomes one '?' and so one <unk>, as the tokenizer gives it.
        body = self.lut[np.frombuffer(seq.encode("ascii", errors="replace"), dtype=np.uint8)]
        return np.concatenate([self.prefix, body, self.suffix])
