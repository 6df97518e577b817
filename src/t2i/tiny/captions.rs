//! Captions for a captioned Fashion-MNIST: each image's class name put into one of a few
//! templates ("a photo of a sandal", …), and the word-level vocabulary the tiny text encoder
//! reads. The vocabulary is built from the templates and class phrases alone, so it is fixed,
//! small, and stored with the model (a checkpoint needs no tokenizer file).

use serde::{Deserialize, Serialize};

/// Fashion-MNIST classes as a caption names them (label order).
pub const FASHION_PHRASES: [&str; 10] = [
    "t-shirt",
    "trousers",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
];

/// Caption templates; `{}` is the class phrase.
pub const TEMPLATES: [&str; 6] = [
    "a photo of a {}",
    "a {}",
    "a picture of a {}",
    "a black and white photo of a {}",
    "an image of a {}",
    "a small {}",
];

pub const PAD: &str = "<pad>";
pub const UNK: &str = "<unk>";

/// Word ↔ id table and the fixed sequence length (captions are cut or padded to it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Vocab {
    /// Id → word; id 0 is `<pad>`, id 1 `<unk>`.
    pub words: Vec<String>,
    pub max_len: usize,
}

/// One tokenized caption.
#[derive(Debug, Clone, PartialEq)]
pub struct Tokens {
    /// `max_len` ids, padded with 0.
    pub ids: Vec<u32>,
    /// Words of the caption (before cutting) not in the vocabulary.
    pub unknown: Vec<String>,
    /// Words cut off past `max_len`.
    pub truncated: usize,
}

impl Vocab {
    /// `<pad>`, `<unk>`, then the sorted words of `templates` and `phrases`.
    pub fn build(templates: &[&str], phrases: &[&str], max_len: usize) -> Self {
        let mut set = std::collections::BTreeSet::new();
        for t in templates {
            for p in phrases {
                set.extend(words(&t.replace("{}", p)));
            }
        }
        let mut w = vec![PAD.to_string(), UNK.to_string()];
        w.extend(set);
        Self { words: w, max_len }
    }

    /// The Fashion-MNIST vocabulary (long enough for the longest template caption).
    pub fn fashion() -> Self {
        let longest = TEMPLATES
            .iter()
            .flat_map(|t| {
                FASHION_PHRASES
                    .iter()
                    .map(move |p| words(&t.replace("{}", p)).len())
            })
            .max()
            .unwrap_or(1);
        Self::build(&TEMPLATES, &FASHION_PHRASES, longest)
    }

    pub fn len(&self) -> usize {
        self.words.len()
    }

    pub fn is_empty(&self) -> bool {
        self.words.is_empty()
    }

    /// Lower-cases, drops punctuation other than '-', splits on whitespace, maps to ids.
    pub fn tokenize(&self, caption: &str) -> Tokens {
        let ws = words(caption);
        let mut ids = Vec::with_capacity(self.max_len);
        let mut unknown = Vec::new();
        for w in ws.iter().take(self.max_len) {
            match self.words.iter().position(|v| v == w) {
                Some(i) => ids.push(i as u32),
                None => {
                    unknown.push(w.clone());
                    ids.push(1);
                }
            }
        }
        let truncated = ws.len().saturating_sub(self.max_len);
        ids.resize(self.max_len, 0);
        Tokens {
            ids,
            unknown,
            truncated,
        }
    }

    /// The empty caption (all padding): the unconditional input of classifier-free guidance.
    pub fn empty(&self) -> Vec<u32> {
        vec![0; self.max_len]
    }
}

/// Words of a caption: lower case, letters / digits / '-' kept, everything else a separator.
pub fn words(caption: &str) -> Vec<String> {
    caption
        .to_lowercase()
        .split(|c: char| !(c.is_alphanumeric() || c == '-'))
        .filter(|w| !w.is_empty())
        .map(|w| w.to_string())
        .collect()
}

/// Caption `template` of `class` (Fashion-MNIST label).
pub fn caption(class: usize, template: usize) -> String {
    TEMPLATES[template % TEMPLATES.len()].replace("{}", FASHION_PHRASES[class % 10])
}

/// The class a prompt names: the longest class phrase found in it as whole words (so "shirt"
/// in "t-shirt" does not count), or `None`.
pub fn class_of(prompt: &str) -> Option<usize> {
    let ws = words(prompt);
    let mut best: Option<(usize, usize)> = None;
    for (c, p) in FASHION_PHRASES.iter().enumerate() {
        let pw = words(p);
        let found = ws.windows(pw.len()).any(|w| w == pw.as_slice());
        if found && best.is_none_or(|(_, l)| pw.len() > l) {
            best = Some((c, pw.len()));
        }
    }
    best.map(|(c, _)| c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vocabulary_covers_every_template_caption_exactly() {
        let v = Vocab::fashion();
        assert_eq!(&v.words[..2], &[PAD, UNK]);
        for c in 0..10 {
            for t in 0..TEMPLATES.len() {
                let tok = v.tokenize(&caption(c, t));
                assert!(
                    tok.unknown.is_empty() && tok.truncated == 0,
                    "{}",
                    caption(c, t)
                );
                assert_eq!(tok.ids.len(), v.max_len);
                assert!(tok.ids.iter().filter(|&&i| i != 0).count() >= 2);
            }
        }
        assert_eq!(v.max_len, 9, "'a black and white photo of a ankle boot'");
        assert_eq!(v.len(), 2 + 21);
    }

    #[test]
    fn tokenize_reports_unknown_and_cut_words() {
        let v = Vocab::fashion();
        let t = v.tokenize("A photo of a RED sandal!");
        assert_eq!(t.unknown, vec!["red".to_string()]);
        assert_eq!(t.ids[4], 1);
        let long = v.tokenize(&"a ".repeat(12));
        assert_eq!(long.truncated, 12 - v.max_len);
        assert_eq!(v.tokenize("").ids, v.empty());
    }

    #[test]
    fn prompt_classes() {
        assert_eq!(class_of("a photo of a t-shirt"), Some(0));
        assert_eq!(class_of("a shirt"), Some(6));
        assert_eq!(class_of("an ankle boot, black and white"), Some(9));
        assert_eq!(class_of("a Sandal"), Some(5));
        assert_eq!(class_of("a cat"), None);
        for c in 0..10 {
            assert_eq!(class_of(&caption(c, 3)), Some(c));
        }
    }
}
