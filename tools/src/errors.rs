//! Error text for operators: an error and its causes on one line, each cause once (the
//! library's errors already show their cause in their own text, and anyhow's `{:#}` would
//! repeat it).

/// `e` and the causes its text does not already contain, joined with ": ".
pub fn describe(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_cause_is_shown_once() {
        let io = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let lib = rdmig_transport::Error::Io {
            context: "connecting to the destination at 127.0.0.1:1".into(),
            source: io,
        };
        let e = anyhow::Error::new(lib).context("migration failed");
        let d = describe(&e);
        assert_eq!(d.matches("refused").count(), 1, "{d}");
        assert!(
            d.starts_with("migration failed: connecting to the destination"),
            "{d}"
        );
    }
}
