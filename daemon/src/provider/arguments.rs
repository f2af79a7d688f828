//! The patch inside a function call's JSON arguments, decoded as the arguments stream.
//!
//! Gateways that offer no freeform (custom) tools bridge `apply_patch` to a function tool with
//! one string argument (`{"input": "*** Begin Patch\n…"}`) and stream the arguments as
//! `response.function_call_arguments.delta`: JSON text cut anywhere, inside escapes too. The
//! live preview needs the patch text itself, so this decoder turns each delta into the part of
//! the first string value it completes. The final item is still parsed whole; this is only for
//! what the user sees while it streams.

/// Where the decoder is in `{"key": "value…"}`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
enum State {
    /// Before the key's opening quote.
    #[default]
    BeforeKey,
    InKey,
    KeyEscape,
    /// Between the key and the colon.
    AfterKey,
    /// After the colon, before the value.
    BeforeValue,
    InValue,
    /// After a backslash in the value.
    Escape,
    /// `\u` and the hex digits so far.
    Unicode(String),
    /// The value ended, or it is not a string: nothing more is decoded.
    Done,
}

/// Decodes the first string value of streamed JSON arguments.
#[derive(Debug, Default)]
pub(crate) struct ArgumentStream {
    state: State,
    /// A high surrogate waiting for its low half.
    high: Option<u16>,
}

impl ArgumentStream {
    /// The decoded text this delta adds (possibly empty).
    pub(crate) fn push(&mut self, delta: &str) -> String {
        let mut out = String::new();
        for c in delta.chars() {
            self.state = match std::mem::take(&mut self.state) {
                State::BeforeKey if c == '"' => State::InKey,
                State::BeforeKey => State::BeforeKey,
                State::InKey if c == '\\' => State::KeyEscape,
                State::InKey if c == '"' => State::AfterKey,
                State::InKey | State::KeyEscape => State::InKey,
                State::AfterKey if c == ':' => State::BeforeValue,
                State::AfterKey => State::AfterKey,
                State::BeforeValue if c.is_whitespace() => State::BeforeValue,
                State::BeforeValue if c == '"' => State::InValue,
                State::BeforeValue | State::Done => State::Done,
                State::InValue if c == '\\' => State::Escape,
                State::InValue if c == '"' => State::Done,
                State::InValue => {
                    out.push(c);
                    State::InValue
                }
                State::Escape => match c {
                    'u' => State::Unicode(String::new()),
                    other => {
                        out.push(match other {
                            'n' => '\n',
                            't' => '\t',
                            'r' => '\r',
                            'b' => '\u{8}',
                            'f' => '\u{c}',
                            // `\"`, `\\`, `\/`, and anything else taken as itself.
                            other => other,
                        });
                        State::InValue
                    }
                },
                State::Unicode(mut hex) => {
                    hex.push(c);
                    if hex.len() < 4 {
                        State::Unicode(hex)
                    } else {
                        self.unicode(&hex, &mut out);
                        State::InValue
                    }
                }
            };
        }
        out
    }

    fn unicode(&mut self, hex: &str, out: &mut String) {
        let Ok(unit) = u16::from_str_radix(hex, 16) else {
            out.push(char::REPLACEMENT_CHARACTER);
            return;
        };
        match (self.high.take(), unit) {
            (None, 0xD800..=0xDBFF) => self.high = Some(unit),
            (Some(high), 0xDC00..=0xDFFF) => {
                let code =
                    0x10000 + ((u32::from(high) - 0xD800) << 10) + (u32::from(unit) - 0xDC00);
                out.push(char::from_u32(code).unwrap_or(char::REPLACEMENT_CHARACTER));
            }
            (high, unit) => {
                if high.is_some() {
                    out.push(char::REPLACEMENT_CHARACTER);
                }
                out.push(char::from_u32(u32::from(unit)).unwrap_or(char::REPLACEMENT_CHARACTER));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PATCH: &str = "*** Begin Patch\n*** Update File: src/a \"b\".rs\n@@\n-\tx\n+\ty é 😀 \\ /\n*** End Patch\n";

    #[test]
    fn a_patch_split_at_every_byte_decodes_to_itself() {
        let json = serde_json::json!({ "input": PATCH }).to_string();
        // Also with escapes JSON need not use: `\/`, `\u00e9` and a surrogate pair.
        let escaped = json
            .replace('é', "\\u00e9")
            .replace('😀', "\\ud83d\\ude00")
            .replace(" /", " \\/");
        for text in [&json, &escaped] {
            for cut in 0..=text.len() {
                if !text.is_char_boundary(cut) {
                    continue;
                }
                let mut stream = ArgumentStream::default();
                let got = stream.push(&text[..cut]) + &stream.push(&text[cut..]);
                assert_eq!(got, PATCH, "cut at {cut} of {text}");
            }
            // One character at a time, as a slow stream would.
            let mut stream = ArgumentStream::default();
            let got: String = text.chars().map(|c| stream.push(&c.to_string())).collect();
            assert_eq!(got, PATCH);
        }
    }

    #[test]
    fn only_the_first_string_value_is_decoded() {
        let mut stream = ArgumentStream::default();
        let got = stream.push(r#"{"input": "a\nb", "other": "c"}"#);
        assert_eq!(got, "a\nb");
        let mut stream = ArgumentStream::default();
        assert_eq!(stream.push(r#"{"n": 1, "input": "x"}"#), "");
    }
}
