//! Diagnostics: what is wrong, where (line and column, both 1-based), and
//! how to fix it. Shared by the policy language and the detection rules,
//! so the CLI shows both kinds of errors the same way.

use std::fmt;

pub mod yaml;

/// A place in a document.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Position {
    pub line: usize,
    pub column: usize,
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.line, self.column)
    }
}

/// One problem found in a document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    pub position: Position,
    pub message: String,
    pub hint: Option<String>,
}

impl Diagnostic {
    pub fn new(position: Position, message: impl Into<String>) -> Self {
        Self {
            position,
            message: message.into(),
            hint: None,
        }
    }

    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    /// The diagnostic with the offending line of `source` and a caret under
    /// the column, as a compiler shows it.
    pub fn render(&self, source: &str, file: &str) -> String {
        let mut out = format!("{file}:{}: error: {}\n", self.position, self.message);
        if let Some(line) = source.lines().nth(self.position.line.saturating_sub(1)) {
            let number = self.position.line.to_string();
            let pad = " ".repeat(number.len());
            out.push_str(&format!("{pad} |\n{number} | {line}\n{pad} | "));
            out.push_str(&" ".repeat(self.position.column.saturating_sub(1)));
            out.push_str("^\n");
        }
        if let Some(hint) = &self.hint {
            out.push_str(&format!("  = hint: {hint}\n"));
        }
        out
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.position, self.message)?;
        if let Some(hint) = &self.hint {
            write!(f, " (hint: {hint})")?;
        }
        Ok(())
    }
}

/// Every problem found in a document, in the order of the text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct Diagnostics(pub Vec<Diagnostic>);

impl Diagnostics {
    pub fn render(&self, source: &str, file: &str) -> String {
        self.0.iter().map(|d| d.render(source, file)).collect()
    }

    pub fn first(&self) -> Option<&Diagnostic> {
        self.0.first()
    }
}

impl fmt::Display for Diagnostics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{d}")?;
        }
        Ok(())
    }
}

/// The closest of `candidates` to a misspelt `word`, if one is close.
pub fn did_you_mean<'a>(
    word: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    candidates
        .into_iter()
        .map(|c| (edit_distance(word, c), c))
        .filter(|(d, c)| *d <= (c.len().max(word.len()) / 3).max(1))
        .min()
        .map(|(_, c)| c)
}

/// Edits (insert, delete, substitute, swap two neighbours) from `a` to `b`:
/// a swap counts once, so `mdoe` is near `mode`.
fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut before: Vec<usize> = Vec::new();
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.iter().enumerate() {
        let mut current = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let substitution = previous[j] + usize::from(ca != cb);
            let mut best = substitution.min(previous[j + 1] + 1).min(current[j] + 1);
            if i > 0 && j > 0 && *ca == b[j - 1] && a[i - 1] == *cb {
                best = best.min(before[j - 1] + 1);
            }
            current.push(best);
        }
        before = std::mem::replace(&mut previous, current);
    }
    previous[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggests_near_words_only() {
        assert_eq!(
            did_you_mean("acton", ["action", "id", "mode"]),
            Some("action")
        );
        assert_eq!(
            did_you_mean("servces", ["services", "rules"]),
            Some("services")
        );
        assert_eq!(did_you_mean("zzz", ["action", "id"]), None);
        assert_eq!(did_you_mean("mdoe", ["mode", "path"]), Some("mode"));
        assert_eq!(did_you_mean("hgih", ["low", "high"]), Some("high"));
    }

    #[test]
    fn renders_the_line_and_a_caret() {
        let d = Diagnostic::new(Position { line: 2, column: 5 }, "bad").with_hint("fix it");
        let text = d.render("a: 1\nb:  x\n", "p.yaml");
        assert_eq!(
            text,
            "p.yaml:2:5: error: bad\n  |\n2 | b:  x\n  |     ^\n  = hint: fix it\n"
        );
    }
}
