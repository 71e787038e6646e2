//! Word-level vocabulary with the reference's ids, and its `tokenizer.json` form.
//!
//! Ids: the tokens counted at least `threshold` times in the cleaned training
//! reports, plus `<unk>`, sorted by code point, numbered from 1. Id 0 is BOS, EOS and
//! padding at once; in `tokenizer.json` it is the special token [`RESERVED`].
use rayon::prelude::*;
use rustc_hash::FxHashMap as HashMap;
use serde_json::{json, Value};

use crate::clean::{
    ascii_split_whitespace, clean_report_into, is_py_space, py_split_whitespace, Dataset, Scratch,
};
use crate::error::Result;
use crate::invalid;

/// Name of id 0 in `tokenizer.json` (cleaning deletes `<` and `>`, so no report token
/// can collide with it or with `<unk>`).
pub const RESERVED: &str = "<pad>";
/// The unknown-token entry, a real id like in the reference.
pub const UNK: &str = "<unk>";
/// Longest row [`Vocab`]'s batch encoding writes (`max_len`): far beyond any report
/// (the reference cuts at 60 or 100 tokens), small enough to refuse absurd requests
/// before allocating.
pub const MAX_SEQ_LEN: usize = 1 << 20;

#[derive(Clone, Debug)]
pub struct Vocab {
    dataset: Dataset,
    /// `tokens[i]` has id `i + 1`.
    tokens: Vec<String>,
    ids: HashMap<String, i64>,
    unk: i64,
}

impl Vocab {
    /// Builds from already cleaned reports (see [`crate::clean::clean_report`]).
    pub fn build<S: AsRef<str> + Sync>(cleaned: &[S], threshold: i64, dataset: Dataset) -> Vocab {
        let counts = cleaned
            .par_iter()
            .fold(HashMap::<String, i64>::default, |mut acc, report| {
                count_tokens(&mut acc, py_split_whitespace(report.as_ref()));
                acc
            })
            .reduce(HashMap::default, merge_counts);
        Vocab::from_counts(counts, threshold, dataset)
    }

    /// Builds from raw reports, cleaning each with the rules of `dataset` on the way
    /// (no cleaned copy of the corpus is kept).
    pub fn build_raw<S: AsRef<str> + Sync>(raw: &[S], threshold: i64, dataset: Dataset) -> Vocab {
        let counts = raw
            .par_iter()
            .with_min_len(256)
            .fold(
                || (HashMap::<String, i64>::default(), Scratch::default()),
                |(mut acc, mut scratch), report| {
                    match clean_report_into(report.as_ref(), dataset, &mut scratch) {
                        (text, true) => count_tokens(&mut acc, ascii_split_whitespace(text)),
                        (text, false) => count_tokens(&mut acc, py_split_whitespace(text)),
                    }
                    (acc, scratch)
                },
            )
            .map(|(acc, _)| acc)
            .reduce(HashMap::default, merge_counts);
        Vocab::from_counts(counts, threshold, dataset)
    }

    fn from_counts(counts: HashMap<String, i64>, threshold: i64, dataset: Dataset) -> Vocab {
        let mut tokens: Vec<String> = counts
            .into_iter()
            .filter(|&(_, n)| n >= threshold)
            .map(|(t, _)| t)
            .collect();
        tokens.push(UNK.to_owned());
        // UTF-8 byte order is code point order, i.e. Python's `list.sort` on str.
        tokens.sort_unstable();
        Vocab::from_sorted(tokens, dataset).expect("cleaned tokens never collide with <unk>")
    }

    fn from_sorted(tokens: Vec<String>, dataset: Dataset) -> Result<Vocab> {
        let mut ids = HashMap::with_capacity_and_hasher(tokens.len(), Default::default());
        for (i, t) in tokens.iter().enumerate() {
            if ids.insert(t.clone(), i as i64 + 1).is_some() {
                return Err(invalid!("token {t:?} appears twice in the vocabulary"));
            }
        }
        let unk = *ids
            .get(UNK)
            .ok_or_else(|| invalid!("the vocabulary has no {UNK} token"))?;
        Ok(Vocab {
            dataset,
            tokens,
            ids,
            unk,
        })
    }

    /// Number of ids including the reserved id 0 (the model's output size).
    pub fn len(&self) -> usize {
        self.tokens.len() + 1
    }

    pub fn is_empty(&self) -> bool {
        false
    }

    pub fn dataset(&self) -> Dataset {
        self.dataset
    }

    pub fn unk_id(&self) -> i64 {
        self.unk
    }

    pub fn token_to_id(&self, token: &str) -> Option<i64> {
        self.ids.get(token).copied()
    }

    pub fn id_to_token(&self, id: i64) -> Option<&str> {
        if id == 0 {
            return Some(RESERVED);
        }
        usize::try_from(id - 1)
            .ok()
            .and_then(|i| self.tokens.get(i))
            .map(String::as_str)
    }

    /// `[0] + ids + [0]` of a cleaned report; unknown tokens map to `<unk>`.
    pub fn encode_cleaned(&self, cleaned: &str) -> Vec<i64> {
        let mut out = vec![0];
        out.extend(
            py_split_whitespace(cleaned).map(|t| self.ids.get(t).copied().unwrap_or(self.unk)),
        );
        out.push(0);
        out
    }

    /// Writes `encode_cleaned(cleaned)[..row.len()]` into `row`, zeros after it.
    pub fn encode_cleaned_into(&self, cleaned: &str, row: &mut [i64]) {
        row.fill(0);
        self.write_ids(py_split_whitespace(cleaned), row);
    }

    /// Cleans `raw` and writes its `encode_cleaned(..)[..row.len()]` into `row`,
    /// which must be all zeros already.
    pub fn encode_raw_into_zeroed(&self, raw: &str, scratch: &mut Scratch, row: &mut [i64]) {
        match clean_report_into(raw, self.dataset, scratch) {
            (text, true) => self.write_ids(ascii_split_whitespace(text), row),
            (text, false) => self.write_ids(py_split_whitespace(text), row),
        }
    }

    /// Ids of `tokens` from `row[1]` on; row[0] is BOS (0) and the trailing EOS is
    /// the zero already there.
    fn write_ids<'t>(&self, tokens: impl Iterator<Item = &'t str>, row: &mut [i64]) {
        for (slot, token) in row.iter_mut().skip(1).zip(tokens) {
            *slot = self.ids.get(token).copied().unwrap_or(self.unk);
        }
    }

    /// Tokens separated by one space. A leading 0 is BOS and skipped; the next 0
    /// (EOS or padding) ends the text.
    pub fn decode(&self, ids: &[i64]) -> Result<String> {
        let body = match ids.first() {
            Some(0) => &ids[1..],
            _ => ids,
        };
        let mut out = String::new();
        for &id in body.iter().take_while(|&&id| id != 0) {
            let token = self.id_to_token(id).ok_or_else(|| {
                invalid!(
                    "token id {id} is outside the vocabulary (0..{})",
                    self.len()
                )
            })?;
            if !out.is_empty() {
                out.push(' ');
            }
            out.push_str(token);
        }
        Ok(out)
    }

    /// The `tokenizer.json` of the Hugging Face `tokenizers` library: a WordLevel
    /// model, whitespace splitting as Python's `str.split()` does it, and id 0 added
    /// at both ends. The cleaning rule is stored as `model.cmn_dataset`, a field
    /// `tokenizers` ignores.
    pub fn to_json(&self) -> String {
        let mut vocab = serde_json::Map::with_capacity(self.len());
        vocab.insert(RESERVED.to_owned(), json!(0));
        for (i, t) in self.tokens.iter().enumerate() {
            vocab.insert(t.clone(), json!(i + 1));
        }
        let special = json!({"SpecialToken": {"id": RESERVED, "type_id": 0}});
        let doc = json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": [{
                "id": 0, "content": RESERVED, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": true
            }],
            // `tokenizers` splits on char::is_whitespace, which lacks U+001C..U+001F.
            "normalizer": {"type": "Replace", "pattern": {"Regex": "[\u{1c}-\u{1f}]"}, "content": " "},
            "pre_tokenizer": {"type": "WhitespaceSplit"},
            "post_processor": {
                "type": "TemplateProcessing",
                "single": [special, {"Sequence": {"id": "A", "type_id": 0}}, special],
                "pair": [special, {"Sequence": {"id": "A", "type_id": 0}},
                         {"Sequence": {"id": "B", "type_id": 1}}, special],
                "special_tokens": {RESERVED: {"id": RESERVED, "ids": [0], "tokens": [RESERVED]}}
            },
            "decoder": null,
            "model": {
                "type": "WordLevel",
                "vocab": Value::Object(vocab),
                "unk_token": UNK,
                "cmn_dataset": self.dataset.name()
            }
        });
        doc.to_string()
    }

    /// Reads [`Vocab::to_json`] output. `dataset` overrides or supplies the cleaning
    /// rule (a file re-saved by `tokenizers` loses `model.cmn_dataset`).
    pub fn from_json(text: &str, dataset: Option<Dataset>) -> Result<Vocab> {
        let doc: Value = serde_json::from_str(text).map_err(|e| invalid!("not valid JSON: {e}"))?;
        let model = doc
            .get("model")
            .ok_or_else(|| invalid!("no \"model\" entry: not a tokenizer.json"))?;
        if model.get("type").and_then(Value::as_str) != Some("WordLevel") {
            return Err(invalid!("model.type must be \"WordLevel\""));
        }
        if model.get("unk_token").and_then(Value::as_str) != Some(UNK) {
            return Err(invalid!("model.unk_token must be {UNK:?}"));
        }
        let dataset = match (dataset, model.get("cmn_dataset").and_then(Value::as_str)) {
            (Some(d), _) => d,
            (None, Some(name)) => Dataset::parse(name)?,
            (None, None) => {
                return Err(invalid!(
                    "model.cmn_dataset is missing: pass the dataset (\"iu_xray\" or \"mimic_cxr\") explicitly"
                ))
            }
        };
        let entries = model
            .get("vocab")
            .and_then(Value::as_object)
            .ok_or_else(|| invalid!("model.vocab must be an object of token -> id"))?;
        // Id 0 must be `<pad>`: `to_json` writes it there, so any other file would not
        // read back the same.
        match entries.get(RESERVED).map(Value::as_i64) {
            Some(Some(0)) => {}
            Some(id) => {
                let id = id.map_or_else(|| "not an integer".to_owned(), |id| format!("{id}"));
                return Err(invalid!(
                    "{RESERVED:?} (BOS/EOS/padding) must have id 0, found {id}"
                ));
            }
            None => {
                return Err(invalid!(
                    "no {RESERVED:?} token with id 0 (BOS/EOS/padding)"
                ))
            }
        }
        let mut tokens = vec![None; entries.len() - 1];
        for (token, id) in entries {
            if token == RESERVED {
                continue;
            }
            let id = id
                .as_i64()
                .ok_or_else(|| invalid!("id of {token:?} is not an integer"))?;
            if id == 0 {
                return Err(invalid!(
                    "id 0 is reserved for {RESERVED:?}, but {token:?} has it too"
                ));
            }
            if token.is_empty() || token.chars().any(is_py_space) {
                return Err(invalid!(
                    "token {token:?} is empty or holds whitespace: no report can produce it"
                ));
            }
            let slot = usize::try_from(id - 1)
                .ok()
                .and_then(|i| tokens.get_mut(i))
                .ok_or_else(|| {
                    invalid!(
                        "id {id} of {token:?} leaves a gap: ids must be 0..{}",
                        entries.len()
                    )
                })?;
            if slot.replace(token.clone()).is_some() {
                return Err(invalid!("id {id} is used twice"));
            }
        }
        let tokens = tokens
            .into_iter()
            .collect::<Option<Vec<String>>>()
            .ok_or_else(|| invalid!("ids are not contiguous"))?;
        Vocab::from_sorted(tokens, dataset)
    }
}

/// Adds one to the count of each token; allocates only for a token seen first.
fn count_tokens<'t>(counts: &mut HashMap<String, i64>, tokens: impl Iterator<Item = &'t str>) {
    for token in tokens {
        match counts.get_mut(token) {
            Some(n) => *n += 1,
            None => {
                counts.insert(token.to_owned(), 1);
            }
        }
    }
}

fn merge_counts(a: HashMap<String, i64>, b: HashMap<String, i64>) -> HashMap<String, i64> {
    let (mut big, small) = if a.len() >= b.len() { (a, b) } else { (b, a) };
    for (token, n) in small {
        *big.entry(token).or_insert(0) += n;
    }
    big
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> Vocab {
        let reports = ["b a a .", "c a ."];
        Vocab::build(&reports, 2, Dataset::MimicCxr)
    }

    #[test]
    fn ids_are_sorted_from_one_with_unk() {
        let v = small();
        // counts: a=3, .=2, b=1, c=1 -> keep ".", "a"; add <unk>; sort.
        assert_eq!(v.len(), 4);
        assert_eq!(v.token_to_id("."), Some(1));
        assert_eq!(v.token_to_id(UNK), Some(2));
        assert_eq!(v.token_to_id("a"), Some(3));
        assert_eq!(v.id_to_token(0), Some(RESERVED));
        assert_eq!(v.id_to_token(4), None);
    }

    #[test]
    fn encode_wraps_in_zeros_and_maps_unknown() {
        let v = small();
        assert_eq!(v.encode_cleaned("a zzz ."), vec![0, 3, 2, 1, 0]);
        assert_eq!(v.encode_cleaned(""), vec![0, 0]);
        let mut row = [9; 3];
        v.encode_cleaned_into("a a a a", &mut row);
        assert_eq!(row, [0, 3, 3]);
        let mut row = [9; 6];
        v.encode_cleaned_into("a .", &mut row);
        assert_eq!(row, [0, 3, 1, 0, 0, 0]);
    }

    #[test]
    fn decode_skips_bos_and_stops_at_zero() {
        let v = small();
        assert_eq!(v.decode(&[0, 3, 1, 0, 3]).unwrap(), "a .");
        assert_eq!(v.decode(&[3, 2]).unwrap(), "a <unk>");
        assert_eq!(v.decode(&[0, 0, 3]).unwrap(), "");
        assert!(v.decode(&[7]).is_err());
        assert!(v.decode(&[-1]).is_err());
    }

    #[test]
    fn json_round_trip() {
        let v = small();
        let back = Vocab::from_json(&v.to_json(), None).unwrap();
        assert_eq!(back.tokens, v.tokens);
        assert_eq!(back.dataset(), Dataset::MimicCxr);
        let forced = Vocab::from_json(&v.to_json(), Some(Dataset::IuXray)).unwrap();
        assert_eq!(forced.dataset(), Dataset::IuXray);
    }

    #[test]
    fn json_errors_are_explained() {
        assert!(Vocab::from_json("{", None).is_err());
        assert!(Vocab::from_json("{}", None).is_err());
        let gap = r#"{"model": {"type": "WordLevel", "unk_token": "<unk>", "cmn_dataset": "iu_xray",
                      "vocab": {"<pad>": 0, "<unk>": 2}}}"#;
        assert!(Vocab::from_json(gap, None).is_err());
    }

    fn with_vocab(vocab: &str) -> Result<Vocab> {
        Vocab::from_json(
            &format!(
                r#"{{"model": {{"type": "WordLevel", "unk_token": "<unk>", "cmn_dataset": "iu_xray", "vocab": {vocab}}}}}"#
            ),
            None,
        )
    }

    #[test]
    fn pad_must_be_id_zero_and_tokens_must_be_producible() {
        assert!(with_vocab(r#"{"<pad>": 0, "<unk>": 1, "a": 2}"#).is_ok());
        let moved = with_vocab(r#"{"a": 0, "<unk>": 1, "<pad>": 2}"#).unwrap_err();
        assert!(
            moved.to_string().contains("must have id 0, found 2"),
            "{moved}"
        );
        let twice = with_vocab(r#"{"<pad>": 0, "<unk>": 1, "a": 0}"#).unwrap_err();
        assert!(twice.to_string().contains("\"a\" has it too"), "{twice}");
        let missing = with_vocab(r#"{"<unk>": 1, "a": 0}"#).unwrap_err();
        assert!(missing.to_string().contains("no \"<pad>\""), "{missing}");
        let err = with_vocab(r#"{"<pad>": 0, "<unk>": 1, "a b": 2}"#).unwrap_err();
        assert!(err.to_string().contains("whitespace"), "{err}");
        assert!(with_vocab(r#"{"<pad>": 0, "<unk>": 1, "": 2}"#).is_err());
        assert!(with_vocab(r#"{"<pad>": 0, "<unk>": 1, "a\u001cb": 2}"#).is_err());
    }
}
