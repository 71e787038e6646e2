//! Report cleaning with exactly the output of the reference implementation
//! (R2GenCMN `clean_report_iu_xray` / `clean_report_mimic_cxr`), quirks included.
//!
//! The reference is Python, so three Python string semantics are reproduced here
//! rather than Rust's: `str.isspace` (used by `strip` and `split()`), `str.lower`
//! (Unicode database of the Python that runs the reference, 14.0 for 3.11) and
//! `str.split(". ")`. Quirks kept on purpose, each pinned by a named test:
//! * the punctuation class `[.,?;*!%^&_+():-\[\]{}]` holds the *range* `:-\[`,
//!   so `: ; < = > ? @ [` and `A-Z` are removed while `-` itself is kept;
//! * the "empty sentence" filter compares a string with a list and never filters,
//!   so empty sentences survive as ` . ` runs;
//! * a literal `1. ` is deleted anywhere in the text (also inside `11. ` or `21. `).
use std::sync::LazyLock;

use memchr::memmem::Finder;

use crate::error::{Error, Result};

/// Which dataset's cleaning rules to apply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dataset {
    IuXray,
    MimicCxr,
}

impl Dataset {
    /// Parses the dataset names used on the command line and in configs.
    pub fn parse(name: &str) -> Result<Dataset> {
        match name {
            "iu_xray" => Ok(Dataset::IuXray),
            "mimic_cxr" => Ok(Dataset::MimicCxr),
            other => Err(Error::Invalid(format!(
                "unknown dataset {other:?}: expected \"iu_xray\" or \"mimic_cxr\""
            ))),
        }
    }

    /// The name accepted by [`Dataset::parse`].
    pub fn name(self) -> &'static str {
        match self {
            Dataset::IuXray => "iu_xray",
            Dataset::MimicCxr => "mimic_cxr",
        }
    }
}

/// Python's `str.isspace` for one character; unlike `char::is_whitespace` it
/// includes the information separators U+001C..U+001F.
pub fn is_py_space(c: char) -> bool {
    matches!(
        c,
        '\t'..='\r'
            | '\u{1c}'..='\u{20}'
            | '\u{85}'
            | '\u{a0}'
            | '\u{1680}'
            | '\u{2000}'..='\u{200a}'
            | '\u{2028}'
            | '\u{2029}'
            | '\u{202f}'
            | '\u{205f}'
            | '\u{3000}'
    )
}

/// Python's `str.strip()` without arguments.
pub fn py_strip(s: &str) -> &str {
    s.trim_matches(is_py_space)
}

/// Python's `str.split()` without arguments: runs of whitespace separate tokens,
/// no empty tokens.
pub fn py_split_whitespace(s: &str) -> impl Iterator<Item = &str> {
    s.split(is_py_space).filter(|t| !t.is_empty())
}

/// Upper-case letters that Rust's Unicode tables (newer than 14.0) lowercase but
/// Python 3.11's `str.lower` leaves alone because they are unassigned there.
fn unknown_to_python(c: char) -> bool {
    matches!(
        c,
        '\u{1c89}'
            | '\u{a7cb}'
            | '\u{a7cc}'
            | '\u{a7ce}'
            | '\u{a7d2}'
            | '\u{a7d4}'
            | '\u{a7da}'
            | '\u{a7dc}'
            | '\u{10d50}'..='\u{10d65}'
            | '\u{16ea0}'..='\u{16eb8}'
    )
}

/// Python's `str.lower()` (full case mapping, final sigma).
///
/// Characters unknown to Python's database are copied unchanged and split the text,
/// because to Python they are neither cased nor case-ignorable, which is also what a
/// string boundary means for the final-sigma rule.
pub fn py_lower(s: &str) -> String {
    if s.is_ascii() {
        return s.to_ascii_lowercase();
    }
    if !s.chars().any(unknown_to_python) {
        return s.to_lowercase();
    }
    let mut out = String::with_capacity(s.len());
    for piece in s.split_inclusive(unknown_to_python) {
        match piece.char_indices().last() {
            Some((i, c)) if unknown_to_python(c) => {
                out.push_str(&piece[..i].to_lowercase());
                out.push(c);
            }
            _ => out.push_str(&piece.to_lowercase()),
        }
    }
    out
}

/// Characters the reference's regex class `[.,?;*!%^&_+():-\[\]{}]` deletes.
const fn is_removed_punct(c: char) -> bool {
    matches!(
        c,
        '.' | ',' | '?' | ';' | '*' | '!' | '%' | '^' | '&' | '_' | '+' | '(' | ')' | ':'
            ..='[' | ']' | '{' | '}'
    )
}

/// Sentence-stage action per ASCII byte: [`DROP`] = delete (quote, slash or punctuation
/// class), otherwise the lower-cased byte to keep.
const DROP: u8 = 0xff;
static ASCII_KEEP: [u8; 128] = {
    let mut table = [DROP; 128];
    let mut b = 0;
    while b < 128 {
        let c = b as u8 as char;
        let lower = c.to_ascii_lowercase();
        if !matches!(c, '"' | '/' | '\\' | '\'') && !is_removed_punct(lower) {
            table[b] = lower as u8;
        }
        b += 1;
    }
    table
};

/// Python's `str.isspace` for ASCII bytes.
fn is_py_space_byte(b: u8) -> bool {
    matches!(b, b'\t'..=b'\r' | 0x1c..=b' ')
}

/// `(pattern, replacement, passes)`: the reference applies some substitutions
/// several times in a row (each pass is one `str.replace`).
type Rule = (&'static str, &'static str, usize);

const IU_RULES: &[Rule] = &[("..", ".", 3)];
const MIMIC_RULES: &[Rule] = &[
    ("\n", " ", 1),
    ("__", "_", 7),
    ("  ", " ", 6),
    ("..", ".", 8),
];
const LIST_RULES: &[Rule] = &[
    ("1. ", "", 1),
    (". 2. ", ". ", 1),
    (". 3. ", ". ", 1),
    (". 4. ", ". ", 1),
    (". 5. ", ". ", 1),
    (" 2. ", ". ", 1),
    (" 3. ", ". ", 1),
    (" 4. ", ". ", 1),
    (" 5. ", ". ", 1),
];

/// `str.replace(from, to)` done in place on UTF-8 bytes. Every pattern is ASCII and
/// never longer than its replacement is short, so the text only shrinks and stays
/// valid UTF-8; matches are found left to right without overlap, as in Python.
fn replace_in_place(buf: &mut Vec<u8>, finder: &Finder<'static>, to: &str) -> bool {
    let (from, to) = (finder.needle().len(), to.as_bytes());
    debug_assert!(to.len() <= from);
    let Some(first) = finder.find(buf) else {
        return false;
    };
    let (mut write, mut read) = (first, first);
    loop {
        buf[write..write + to.len()].copy_from_slice(to);
        write += to.len();
        read += from;
        match finder.find(&buf[read..]) {
            Some(gap) => {
                buf.copy_within(read..read + gap, write);
                write += gap;
                read += gap;
            }
            None => {
                let rest = buf.len() - read;
                buf.copy_within(read.., write);
                write += rest;
                break;
            }
        }
    }
    buf.truncate(write);
    true
}

/// A [`Rule`] with its substring searcher built once.
struct Compiled {
    finder: Finder<'static>,
    to: &'static str,
    passes: usize,
}

fn compile(rules: &'static [Rule]) -> Vec<Compiled> {
    rules
        .iter()
        .map(|&(from, to, passes)| Compiled {
            finder: Finder::new(from),
            to,
            passes,
        })
        .collect()
}

static IU: LazyLock<Vec<Compiled>> = LazyLock::new(|| compile(IU_RULES));
static MIMIC: LazyLock<Vec<Compiled>> = LazyLock::new(|| compile(MIMIC_RULES));
static LISTS: LazyLock<Vec<Compiled>> = LazyLock::new(|| compile(LIST_RULES));
static SENTENCE_END: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(". "));

fn apply_rules(buf: &mut Vec<u8>, rules: &[Compiled]) {
    for rule in rules {
        for _ in 0..rule.passes {
            // A pass that changes nothing makes the following identical passes no-ops.
            if !replace_in_place(buf, &rule.finder, rule.to) {
                break;
            }
        }
    }
}

/// Whole-report stage: dataset-specific substitutions, the numbered-list rules,
/// then `strip().lower()`.
fn report_stage(text: &str, dataset: Dataset) -> String {
    let mut buf = text.as_bytes().to_vec();
    apply_rules(
        &mut buf,
        match dataset {
            Dataset::IuXray => &IU,
            Dataset::MimicCxr => &MIMIC,
        },
    );
    apply_rules(&mut buf, &LISTS);
    let text = String::from_utf8(buf).expect("ASCII substitutions keep UTF-8 valid");
    py_lower(py_strip(&text))
}

/// Sentence stage: drop quotes and slashes, strip, lower, delete the punctuation class.
fn sentence_stage(sentence: &str, out: &mut Vec<u8>) {
    let is_quote = |c: char| matches!(c, '"' | '/' | '\\' | '\'');
    if sentence.is_ascii() {
        // Quotes go first, so `strip` sees through them: skip both at the ends.
        let bytes = sentence.as_bytes();
        let kept = |b: &u8| !is_quote(*b as char) && !is_py_space_byte(*b);
        let Some(start) = bytes.iter().position(kept) else {
            return;
        };
        let end = bytes.iter().rposition(kept).unwrap_or(start);
        out.reserve(end + 1 - start);
        for &b in &bytes[start..=end] {
            let keep = ASCII_KEEP[b as usize];
            if keep != DROP {
                out.push(keep);
            }
        }
        return;
    }
    let unquoted: String = sentence.chars().filter(|&c| !is_quote(c)).collect();
    let lowered = py_lower(py_strip(&unquoted));
    let mut utf8 = [0u8; 4];
    for c in lowered.chars().filter(|&c| !is_removed_punct(c)) {
        out.extend_from_slice(c.encode_utf8(&mut utf8).as_bytes());
    }
}

/// Cleans one report exactly like the reference code for `dataset`.
pub fn clean_report(text: &str, dataset: Dataset) -> String {
    let report = report_stage(text, dataset);
    let mut out = Vec::with_capacity(report.len() + 4);
    let splitter = &*SENTENCE_END;
    let mut rest = report.as_str();
    loop {
        match splitter.find(rest.as_bytes()) {
            Some(at) => {
                sentence_stage(&rest[..at], &mut out);
                out.extend_from_slice(b" . ");
                rest = &rest[at + 2..];
            }
            None => {
                sentence_stage(rest, &mut out);
                break;
            }
        }
    }
    out.extend_from_slice(b" .");
    String::from_utf8(out).expect("only whole characters are copied")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mimic(s: &str) -> String {
        clean_report(s, Dataset::MimicCxr)
    }

    fn iu(s: &str) -> String {
        clean_report(s, Dataset::IuXray)
    }

    #[test]
    fn control_characters_survive() {
        assert_eq!(iu("a\0b\x7f"), "a\0b\x7f .");
    }

    #[test]
    fn plain_report() {
        assert_eq!(
            mimic("The lungs are clear. No effusion."),
            "the lungs are clear . no effusion ."
        );
    }

    #[test]
    fn quirk_colon_to_bracket_range_removes_comparison_signs_and_at() {
        assert_eq!(mimic("a<b=c>d@e?f;g:h[i]j"), "abcdefghij .");
        // '-' is not in the class: the range swallowed it.
        assert_eq!(mimic("well-defined"), "well-defined .");
    }

    #[test]
    fn quirk_empty_sentences_are_kept() {
        assert_eq!(mimic(". . ."), " .  .  .");
        assert_eq!(mimic(""), " .");
        assert_eq!(iu("!!!"), " .");
    }

    #[test]
    fn quirk_one_dot_space_deleted_anywhere() {
        assert_eq!(mimic("see 11. nodes"), "see 1nodes .");
        assert_eq!(mimic("1. clear. 2. normal"), "clear . normal .");
    }

    #[test]
    fn numbered_list_with_space_marker() {
        assert_eq!(iu("clear 3. normal"), "clear . normal .");
    }

    #[test]
    fn mimic_collapses_underscores_newlines_and_spaces() {
        assert_eq!(mimic("___ noted\nhere"), " noted here .");
        assert_eq!(iu("a\nb"), "a\nb .");
    }

    #[test]
    fn iu_keeps_double_spaces_mimic_collapses_them() {
        assert_eq!(iu("a  b"), "a  b .");
        assert_eq!(mimic("a  b"), "a b .");
    }

    #[test]
    fn python_whitespace_includes_information_separators() {
        assert!(is_py_space('\u{1c}'));
        assert!(!'\u{1c}'.is_whitespace());
        assert_eq!(py_strip("\u{1f} x \u{1c}"), "x");
        assert_eq!(
            py_split_whitespace("a\u{1d}b").collect::<Vec<_>>(),
            ["a", "b"]
        );
    }

    #[test]
    fn lowercase_matches_python_on_special_cases() {
        assert_eq!(py_lower("İ"), "i\u{307}");
        assert_eq!(py_lower("ΑΣ"), "ας");
        assert_eq!(py_lower("ΑΣΑ"), "ασα");
        // unknown to Python 3.11: kept, and acts like a word boundary for sigma.
        assert_eq!(py_lower("ΑΣ\u{a7cb}"), "ας\u{a7cb}");
        assert_eq!(py_lower("\u{10d50}"), "\u{10d50}");
    }

    #[test]
    fn dataset_names() {
        assert_eq!(Dataset::parse("iu_xray").unwrap(), Dataset::IuXray);
        assert_eq!(Dataset::parse("mimic_cxr").unwrap().name(), "mimic_cxr");
        assert!(Dataset::parse("chexpert").is_err());
    }
}
