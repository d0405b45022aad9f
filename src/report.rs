//! Errors as one line of text: the error and each of its causes once, `: `-separated, for
//! messages that leave the process (gRPC statuses, logs, reject reports, the CLI's stderr).
//! Error types here print only their own message; their causes come from `source()`.

use std::fmt;

/// Displays an error with its chain of causes; a cause whose text is already shown (some
/// library errors embed their source in their own message) is left out.
pub struct Chain<'a>(pub &'a (dyn std::error::Error + 'a));

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut shown = String::new();
        let mut cause: Option<&dyn std::error::Error> = Some(self.0);
        while let Some(e) = cause {
            let msg = e.to_string();
            if !msg.is_empty() && !shown.contains(&msg) {
                if !shown.is_empty() {
                    shown.push_str(": ");
                }
                shown.push_str(&msg);
            }
            cause = e.source();
        }
        f.write_str(&shown)
    }
}

/// [`Chain`] as a `String`.
pub fn chain(e: &dyn std::error::Error) -> String {
    Chain(e).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("cannot read catalogue c.jsonl")]
    struct Outer {
        source: Embeds,
    }

    #[derive(Debug, thiserror::Error)]
    #[error("tcp connect error: {source}")]
    struct Embeds {
        source: std::io::Error,
    }

    /// Every `#[error]` message in src/ that names a field which is also the error's source
    /// (`source`, `#[source]`, `#[from]`): printed with the chain, that cause shows twice.
    fn messages_embedding_their_source(dir: &std::path::Path, found: &mut Vec<String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                messages_embedding_their_source(&path, found);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            let lines: Vec<&str> = text.lines().collect();
            for (i, line) in lines.iter().enumerate() {
                let Some(at) = line.find("#[error(\"") else { continue };
                let message = &line[at..];
                // The variant's fields: the next lines up to the end of the variant.
                let fields: String = lines[i + 1..].iter().take(6).copied().collect::<Vec<_>>().join(" ");
                let fields = fields.split("#[error(").next().unwrap_or("");
                let tuple_source = fields.trim_start().split_once('(').is_some_and(|(_, rest)| {
                    rest.trim_start().starts_with("#[from]") || rest.trim_start().starts_with("#[source]")
                });
                if message.contains("{source}") || (message.contains("{0}") && tuple_source) {
                    found.push(format!("{}:{}: {}", path.display(), i + 1, line.trim()));
                }
            }
        }
    }

    #[test]
    fn no_error_message_embeds_its_source() {
        let mut found = Vec::new();
        messages_embedding_their_source(
            &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
            &mut found,
        );
        let this_file: Vec<_> = found.iter().filter(|f| !f.contains("report.rs")).collect();
        assert!(this_file.is_empty(), "messages that embed their source:\n{this_file:#?}");
        assert_eq!(found.len(), 1, "the check finds the example in this file: {found:?}");
    }

    #[test]
    fn each_cause_once() {
        let e = Outer { source: Embeds { source: std::io::Error::other("refused") } };
        assert_eq!(chain(&e), "cannot read catalogue c.jsonl: tcp connect error: refused");
        assert_eq!(chain(&std::io::Error::other("alone")), "alone");
    }
}
