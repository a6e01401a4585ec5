import pytest

from memlm.errors import CheckpointError
from memlm.tokenizer import BOS, DB_END, DB_ENTITY, DB_RETURN, EOS, PAD, SPECIAL_TOKENS, Tokenizer

CORPUS = ["Ada Lovelace was born in London.", "Zoë studied at Universität Wien.", "東京 is big."] * 10


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(CORPUS, vocab_size=320)


@pytest.mark.parametrize(
    "text",
    ["plain ascii", "naïve café — Ωμέγα", "日本語のテキスト", "emoji 🚀👩‍🔬 and \t tabs\n", "", "  spaces  "],
)
def test_unicode_round_trips(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_special_tokens_are_distinct_single_ids(tok):
    ids = [tok.token_id(t) for t in SPECIAL_TOKENS]
    assert len(set(ids)) == len(SPECIAL_TOKENS)
    assert len({tok.pad_id, tok.bos_id, tok.eos_id}) == 3
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == tuple(tok.token_id(t) for t in (PAD, BOS, EOS))
    s = f"{DB_ENTITY} Ada{DB_RETURN} London{DB_END}"
    ids = tok.encode(s)
    assert tok.token_id(DB_ENTITY) in ids and tok.token_id(DB_END) in ids
    assert tok.decode(ids, skip_special_tokens=False) == s
    assert tok.decode(ids) == " Ada London"


def test_bos_eos_and_save_load(tok, tmp_path):
    ids = tok.encode("Ada", bos=True, eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    tok.save(tmp_path)
    again = Tokenizer.load(tmp_path)
    assert again.encode("Zoë studied") == tok.encode("Zoë studied")
    assert again.fingerprint() == tok.fingerprint()


def test_corrupt_tokenizer_file_is_rejected(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        Tokenizer.load(tmp_path)
