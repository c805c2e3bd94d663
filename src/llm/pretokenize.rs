//! Pre-tokenization: how text is cut into words before byte-level BPE, for the pre-tokenizer
//! types a GGUF names in `tokenizer.ggml.pre`.
//!
//! Supported (the cuts llama.cpp makes for these types, see docs/wasi-nn.md):
//!
//! - `gpt2`: the GPT-2 pattern
//!   `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`
//!   (contractions are case-sensitive; the optional prefix is U+0020 only).
//! - `smollm` and the types llama.cpp treats alike (`starcoder`, `refact`, `command-r`,
//!   `codeshell`, `exaone`, `minerva`): every `\p{N}` code point on its own first, then the GPT-2
//!   pattern on each remaining run.
//!
//! `\p{L}` and `\p{N}` are Unicode general categories (tables from `regex-syntax`); `\s` is the
//! Unicode `White_Space` property. The cut is written by hand (no regex engine: the pattern needs
//! a negative lookahead) and runs in time linear in the text.

use std::sync::OnceLock;

/// A pre-tokenizer type this crate implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PreTokenizer {
    /// The GPT-2 pattern alone.
    Gpt2,
    /// Every number code point alone, then the GPT-2 pattern (SmolLM2, StarCoder, ...).
    DigitsThenGpt2,
}

impl PreTokenizer {
    /// The type named by `tokenizer.ggml.pre` (absent: `default`), or `None` when unsupported.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "gpt2" | "gpt-2" => Some(Self::Gpt2),
            "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva" => Some(Self::DigitsThenGpt2),
            _ => None,
        }
    }

    /// The names [`Self::from_name`] accepts, for error messages.
    pub const SUPPORTED: &'static str = "gpt2, smollm, starcoder, refact, command-r, codeshell, exaone, minerva";

    /// Cuts `text` into words, appending each to `out` (in order; together they are `text`).
    pub fn split<'a>(self, text: &'a str, out: &mut Vec<&'a str>) {
        match self {
            Self::Gpt2 => gpt2(text, out),
            Self::DigitsThenGpt2 => {
                let mut start = 0;
                for (i, c) in text.char_indices() {
                    if is_number(c) {
                        gpt2(&text[start..i], out);
                        let end = i + c.len_utf8();
                        out.push(&text[i..end]);
                        start = end;
                    }
                }
                gpt2(&text[start..], out);
            }
        }
    }
}

/// Sorted, disjoint code point ranges of one Unicode class.
struct Ranges(Vec<(u32, u32)>);

impl Ranges {
    fn of(class: &str) -> Self {
        use regex_syntax::hir::{Class, HirKind};
        let hir = regex_syntax::parse(class).expect("a Unicode class regex-syntax knows");
        let HirKind::Class(Class::Unicode(set)) = hir.kind() else { unreachable!("{class} is a Unicode class") };
        Self(set.ranges().iter().map(|r| (u32::from(r.start()), u32::from(r.end()))).collect())
    }

    fn contains(&self, c: char) -> bool {
        let c = u32::from(c);
        self.0
            .binary_search_by(|&(lo, hi)| {
                if hi < c {
                    std::cmp::Ordering::Less
                } else if lo > c {
                    std::cmp::Ordering::Greater
                } else {
                    std::cmp::Ordering::Equal
                }
            })
            .is_ok()
    }
}

fn is_letter(c: char) -> bool {
    static L: OnceLock<Ranges> = OnceLock::new();
    if c.is_ascii() {
        return c.is_ascii_alphabetic();
    }
    L.get_or_init(|| Ranges::of(r"\p{L}")).contains(c)
}

fn is_number(c: char) -> bool {
    static N: OnceLock<Ranges> = OnceLock::new();
    if c.is_ascii() {
        return c.is_ascii_digit();
    }
    N.get_or_init(|| Ranges::of(r"\p{N}")).contains(c)
}

/// The class of one code point as the GPT-2 pattern sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Letter,
    Number,
    Space,
    Other,
}

fn kind(c: char) -> Kind {
    if c.is_whitespace() {
        Kind::Space
    } else if is_letter(c) {
        Kind::Letter
    } else if is_number(c) {
        Kind::Number
    } else {
        Kind::Other
    }
}

/// The GPT-2 pattern over `text`, leftmost match first, as llama.cpp's hand-written matcher cuts.
fn gpt2<'a>(text: &'a str, out: &mut Vec<&'a str>) {
    if text.is_empty() {
        return;
    }
    let chars: Vec<(usize, char)> = text.char_indices().collect();
    let n = chars.len();
    let at = |i: usize| chars.get(i).map(|&(_, c)| c);
    let byte = |i: usize| chars.get(i).map_or(text.len(), |&(b, _)| b);
    let kind_at = |i: usize| at(i).map(kind);
    let mut pos = 0;
    while pos < n {
        let start = pos;
        let c = chars[pos].1;
        // 's|'t|'re|'ve|'m|'ll|'d
        if c == '\'' && pos + 1 < n {
            let next = chars[pos + 1].1;
            if matches!(next, 's' | 't' | 'm' | 'd') {
                pos += 2;
                out.push(&text[byte(start)..byte(pos)]);
                continue;
            }
            if pos + 2 < n {
                let pair = (next, chars[pos + 2].1);
                if matches!(pair, ('r', 'e') | ('v', 'e') | ('l', 'l')) {
                    pos += 3;
                    out.push(&text[byte(start)..byte(pos)]);
                    continue;
                }
            }
        }
        // The class after an optional leading space.
        let lead = if c == ' ' { kind_at(pos + 1) } else { Some(kind(c)) };
        if let Some(k @ (Kind::Letter | Kind::Number | Kind::Other)) = lead {
            // ` ?\p{L}+`, ` ?\p{N}+`, ` ?[^\s\p{L}\p{N}]+`
            if c == ' ' {
                pos += 1;
            }
            while kind_at(pos) == Some(k) {
                pos += 1;
            }
            out.push(&text[byte(start)..byte(pos)]);
            continue;
        }
        let mut spaces = 0;
        while kind_at(pos + spaces) == Some(Kind::Space) {
            spaces += 1;
        }
        if spaces > 1 && pos + spaces < n {
            // `\s+(?!\S)`: leave the last space to prefix the next word.
            pos += spaces - 1;
        } else if spaces > 0 {
            pos += spaces;
        } else {
            pos += 1;
        }
        out.push(&text[byte(start)..byte(pos)]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cut(p: PreTokenizer, s: &str) -> Vec<&str> {
        let mut v = Vec::new();
        p.split(s, &mut v);
        assert_eq!(v.concat(), s, "the words make the text");
        v
    }

    #[test]
    fn gpt2_cuts_like_the_pattern() {
        let p = PreTokenizer::Gpt2;
        assert_eq!(cut(p, "Hello world's  end!!  "), ["Hello", " world", "'s", " ", " end", "!!", "  "]);
        assert_eq!(cut(p, "a\n\nb"), ["a", "\n", "\n", "b"]);
        assert_eq!(cut(p, "I'LL x're"), ["I", "'", "LL", " x", "'re"]);
        assert_eq!(cut(p, " 123abc"), [" 123", "abc"]);
        assert_eq!(cut(p, "héllo wörld"), ["héllo", " wörld"]);
        assert_eq!(cut(p, ""), Vec::<&str>::new());
    }

    #[test]
    fn smollm_splits_every_digit() {
        let p = PreTokenizer::DigitsThenGpt2;
        assert_eq!(cut(p, "x 2024!"), ["x", " ", "2", "0", "2", "4", "!"]);
        assert_eq!(cut(p, "٣٤"), ["٣", "٤"]);
    }

    #[test]
    fn the_unicode_classes_are_general_categories() {
        assert!(is_letter('é') && is_letter('中') && !is_letter('\u{301}'));
        assert!(is_number('½') && is_number('٣') && !is_number('a'));
        assert_eq!(PreTokenizer::from_name("smollm"), Some(PreTokenizer::DigitsThenGpt2));
        assert_eq!(PreTokenizer::from_name("llama3"), None);
    }
}
