//! Parsing of the edits a model sends back (docs/protocol.md, "Patch formats"): the Codex `apply_patch` format,
//! which Codex models are trained to emit, and aider's SEARCH/REPLACE blocks as a second format.
//! Both become one [`Patch`]. Finding chunks in a file is `matcher`'s job and path validation
//! belongs to the path module, so paths come back exactly as written.
//!
//! The `apply_patch` parser is a line-at-a-time state machine: [`StreamingParser`] (fed with
//! tool-call deltas) and [`parse_patch`] run the same code, so they cannot disagree, and parsing
//! is linear in the input.

use std::collections::HashMap;
use std::collections::hash_map::Entry;

const BEGIN_PATCH: &str = "*** Begin Patch";
const END_PATCH: &str = "*** End Patch";
const END_OF_FILE: &str = "*** End of File";
const ADD_FILE: &str = "*** Add File:";
const DELETE_FILE: &str = "*** Delete File:";
const UPDATE_FILE: &str = "*** Update File:";
const MOVE_TO: &str = "*** Move to:";
/// Longest quote of an input line in an error: enough to recognise it, short enough for a line.
const MAX_QUOTE_CHARS: usize = 80;
/// aider looks this far above `<<<<<<< SEARCH` for the file path, stepping over fence lines.
const PATH_LOOKBACK: usize = 3;
const END_OF_INPUT: &str = "end of input";

const EXPECT_BEGIN: &str = "'*** Begin Patch'";
const EXPECT_END: &str = "'*** End Patch'";
const EXPECT_FILE_OP: &str =
    "'*** Add File: ', '*** Delete File: ', '*** Update File: ' or '*** End Patch'";
const EXPECT_CHUNK_LINE: &str = "a chunk line starting with ' ', '+' or '-'";

/// A parsed edit: file operations in the order the patch gives them.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct Patch {
    pub(crate) ops: Vec<FileOp>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum FileOp {
    /// Create `path` with these lines (no terminators).
    Add {
        path: String,
        lines: Vec<String>,
    },
    Delete {
        path: String,
    },
    /// Change `path` chunk by chunk, in file order, optionally renaming it.
    Update {
        path: String,
        move_to: Option<String>,
        chunks: Vec<Chunk>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OpKind {
    Add,
    Delete,
    Update,
}

/// One change inside an update: `old_lines` are replaced by `new_lines`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct Chunk {
    /// Text after `@@ `: a line (usually a signature) to find before looking for `old_lines`.
    pub(crate) context: Option<String>,
    /// Context and removed lines, in order.
    pub(crate) old_lines: Vec<String>,
    /// Context and added lines, in order.
    pub(crate) new_lines: Vec<String>,
    /// `*** End of File`: the chunk is anchored at the end of the file.
    pub(crate) end_of_file: bool,
}

/// What the streaming parser learned from a complete line, for a live preview.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum StreamEvent {
    /// `*** Add File:`, `*** Delete File:` or `*** Update File:` was read.
    FileStarted { path: String, kind: OpKind },
    /// The update of `path` also renames it to `to`.
    MovedTo { path: String, to: String },
    /// A chunk of the update of `path` begins; `context` is its `@@` text.
    ChunkStarted {
        path: String,
        context: Option<String>,
    },
    /// A content line: '+' added (all Add File lines), '-' removed, ' ' context.
    Line {
        path: String,
        sign: char,
        text: String,
    },
    /// `*** End Patch` was read.
    Ended,
}

/// A patch that cannot be parsed, with the 1-based input line where that became clear.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("patch line {line}: {kind}")]
pub(crate) struct ParseError {
    pub(crate) line: usize,
    pub(crate) kind: ParseErrorKind,
}

/// `found` fields hold the offending line already quoted (and shortened), or "end of input".
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum ParseErrorKind {
    #[error("expected {expected}, found {found}")]
    Unexpected {
        expected: &'static str,
        found: String,
    },
    #[error("unknown marker {found}; expected {}", EXPECT_FILE_OP)]
    UnknownMarker { found: String },
    #[error("missing path in {found}")]
    EmptyPath { found: String },
    #[error(
        "'*** Update File: {}' has no chunk: expected '@@' or a line starting with ' ', '+' or \
         '-', found {found}",
        shorten(.path)
    )]
    EmptyUpdate { path: String, found: String },
    #[error("path '{}' appears twice in one patch (first on line {first_line})", shorten(.path))]
    DuplicatePath { path: String, first_line: usize },
    #[error("the heredoc is not closed: expected '{delimiter}', found {found}")]
    MissingHeredocEnd { delimiter: String, found: String },
    #[error("the patch has no file operation")]
    NoOperations,
    #[error("SEARCH/REPLACE block without a file path: put the path on the line before it")]
    MissingPath,
    #[error("no '*** Begin Patch' or '<<<<<<< SEARCH' found")]
    NotAPatch,
}

impl ParseError {
    /// Stable snake_case code for the wire; the match is exhaustive so a new kind needs one.
    pub(crate) fn code(&self) -> &'static str {
        match &self.kind {
            ParseErrorKind::Unexpected { .. }
            | ParseErrorKind::UnknownMarker { .. }
            | ParseErrorKind::EmptyPath { .. }
            | ParseErrorKind::EmptyUpdate { .. }
            | ParseErrorKind::MissingHeredocEnd { .. }
            | ParseErrorKind::MissingPath => "patch_syntax",
            ParseErrorKind::DuplicatePath { .. } => "patch_duplicate_path",
            ParseErrorKind::NoOperations => "patch_empty",
            ParseErrorKind::NotAPatch => "patch_not_found",
        }
    }
}

/// Parses a whole `apply_patch` text (optionally wrapped in a heredoc).
pub(crate) fn parse_patch(text: &str) -> Result<Patch, ParseError> {
    let mut machine = Machine::new(false);
    let mut partial = String::new();
    feed(&mut partial, &mut machine, text);
    machine.finish(&partial)
}

/// Parses either format. A Codex patch may also sit inside prose or a Markdown fence (patches in
/// plain message text, docs/protocol.md "Patch formats"): then it is parsed from its `*** Begin Patch` line and whatever
/// follows `*** End Patch` is ignored.
pub(crate) fn parse_any(text: &str) -> Result<Patch, ParseError> {
    let first = text.lines().map(str::trim).find(|line| !line.is_empty());
    if first.is_some_and(|line| line == BEGIN_PATCH || heredoc_delimiter(line).is_some()) {
        return parse_patch(text);
    }
    if text
        .lines()
        .any(|line| sr_marker(line) == Some(SrMarker::Search))
    {
        return parse_search_replace(text);
    }
    let mut offset = 0;
    for (index, line) in text.split_inclusive('\n').enumerate() {
        if line.trim() == BEGIN_PATCH {
            let mut machine = Machine::new(false);
            machine.line_no = index;
            machine.ignore_after_end = true;
            let mut partial = String::new();
            feed(&mut partial, &mut machine, &text[offset..]);
            return machine.finish(&partial);
        }
        offset += line.len();
    }
    Err(ParseError {
        line: 1,
        kind: ParseErrorKind::NotAPatch,
    })
}

/// Incremental `apply_patch` parser for tool-call deltas: events come out as soon as a line is
/// complete, and [`finish`](Self::finish) returns exactly what [`parse_patch`] returns for the
/// concatenated text.
#[derive(Debug)]
pub(crate) struct StreamingParser {
    /// The start of a line whose newline has not arrived yet.
    partial: String,
    machine: Machine,
}

impl Default for StreamingParser {
    fn default() -> Self {
        Self::new()
    }
}

impl StreamingParser {
    pub(crate) fn new() -> Self {
        StreamingParser {
            partial: String::new(),
            machine: Machine::new(true),
        }
    }

    /// Consumes the next piece of text. After an error it emits nothing more: `finish` reports it.
    pub(crate) fn push(&mut self, delta: &str) -> Vec<StreamEvent> {
        feed(&mut self.partial, &mut self.machine, delta);
        std::mem::take(&mut self.machine.events)
    }

    pub(crate) fn finish(self) -> Result<Patch, ParseError> {
        self.machine.finish(&self.partial)
    }
}

/// Hands every complete line of `text` to `machine`, keeping an unfinished line in `partial`.
/// Each byte is looked at once, whatever the size of the deltas.
fn feed(partial: &mut String, machine: &mut Machine, text: &str) {
    if machine.stopped() {
        return;
    }
    let mut rest = text;
    while let Some(newline) = rest.find('\n') {
        let (head, tail) = rest.split_at(newline);
        // `partial` is only non-empty for a line cut by a delta boundary, so parsing a whole
        // text copies no line.
        if partial.is_empty() {
            machine.line(head);
        } else {
            partial.push_str(head);
            machine.line(partial);
            partial.clear();
        }
        rest = &tail[1..];
        if machine.stopped() {
            return;
        }
    }
    partial.push_str(rest);
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Before `*** Begin Patch`; a heredoc opener may come first.
    Start,
    /// After a heredoc opener, before `*** Begin Patch`.
    Heredoc,
    /// Between file operations.
    Ops,
    /// Inside an Add File: '+' lines.
    Add,
    /// Right after `*** Update File:` (and `*** Move to:`), before the first chunk.
    UpdateHeader { move_allowed: bool },
    /// After an `@@` line: the chunk still needs a line.
    ChunkHeader,
    /// Inside a chunk with at least one line.
    Chunk,
    /// After `*** End of File`: only a new chunk or a file marker may follow.
    AfterEof,
    /// After a chunk line that reads `*** End Patch` once trimmed (` *** End Patch`): the end
    /// of the patch if what follows cannot continue the chunk, else a context line after all.
    MaybeEnded,
    /// After `*** End Patch`.
    Ended,
    /// After the heredoc's closing delimiter.
    Closed,
}

/// What a line starting with `***` means (or `Plain` when it is not a marker).
#[derive(Debug, PartialEq, Eq)]
enum Marker<'a> {
    Plain,
    Begin,
    End,
    EndOfFile,
    File(OpKind, &'a str),
    MoveTo(&'a str),
    EmptyPath,
    Unknown,
}

#[derive(Debug)]
struct Machine {
    state: State,
    /// Lines consumed so far: the 1-based number of the line being parsed.
    line_no: usize,
    heredoc: Option<String>,
    ops: Vec<FileOp>,
    /// Every path named so far, with the line naming it.
    paths: HashMap<String, usize>,
    error: Option<ParseError>,
    /// `parse_any`'s embedded mode: prose after `*** End Patch` is not ours to judge.
    ignore_after_end: bool,
    emit: bool,
    events: Vec<StreamEvent>,
    /// In [`State::MaybeEnded`]: the padded end line and the blank lines after it.
    held: Vec<String>,
}

impl Machine {
    fn new(emit: bool) -> Self {
        Machine {
            state: State::Start,
            line_no: 0,
            heredoc: None,
            ops: Vec::new(),
            paths: HashMap::new(),
            error: None,
            ignore_after_end: false,
            emit,
            events: Vec::new(),
            held: Vec::new(),
        }
    }

    fn stopped(&self) -> bool {
        self.error.is_some() || (self.ignore_after_end && self.state == State::Ended)
    }

    fn line(&mut self, raw: &str) {
        if self.stopped() {
            return;
        }
        self.line_no += 1;
        // As with `str::lines`: a CRLF patch has the same lines as its LF twin.
        let line = raw.strip_suffix('\r').unwrap_or(raw);
        if let Err(kind) = self.step(line) {
            self.error = Some(ParseError {
                line: self.line_no,
                kind,
            });
        }
    }

    fn finish(mut self, partial: &str) -> Result<Patch, ParseError> {
        if !partial.is_empty() {
            self.line(partial);
        }
        if let Some(error) = self.error {
            return Err(error);
        }
        if self.state == State::MaybeEnded {
            // Nothing followed the padded end line: it was the end, as Codex reads its last line.
            self.end();
        }
        let kind = match self.state {
            State::MaybeEnded => None,
            State::Closed => None,
            State::Ended => self
                .heredoc
                .filter(|_| !self.ignore_after_end)
                .map(|delimiter| ParseErrorKind::MissingHeredocEnd {
                    delimiter,
                    found: END_OF_INPUT.to_owned(),
                }),
            State::Start | State::Heredoc => Some(unexpected_end(EXPECT_BEGIN)),
            State::Ops
            | State::Add
            | State::UpdateHeader { .. }
            | State::ChunkHeader
            | State::Chunk
            | State::AfterEof => Some(unexpected_end(EXPECT_END)),
        };
        // An early end is reported on the line after the last one: that is where text is missing.
        match kind {
            None => Ok(Patch { ops: self.ops }),
            Some(kind) => Err(ParseError {
                line: self.line_no + 1,
                kind,
            }),
        }
    }

    fn step(&mut self, line: &str) -> Result<(), ParseErrorKind> {
        // Marker lines tolerate trailing whitespace (a stray '\r' above all); content does not.
        let marker = line.trim_end();
        match self.state {
            State::Start | State::Heredoc => {
                let trimmed = marker.trim_start();
                if trimmed.is_empty() {
                    // Blank lines around the whole patch are fine, as in Codex.
                } else if trimmed == BEGIN_PATCH {
                    self.state = State::Ops;
                } else if let Some(delimiter) =
                    heredoc_delimiter(trimmed).filter(|_| self.state == State::Start)
                {
                    self.heredoc = Some(delimiter.to_owned());
                    self.state = State::Heredoc;
                } else {
                    return Err(unexpected(EXPECT_BEGIN, line));
                }
                Ok(())
            }
            // Between operations no content can stand, so a padded marker means one thing.
            State::Ops => self.file_marker(line),
            State::Add => match line.strip_prefix('+') {
                Some(text) => {
                    self.add_line(text);
                    Ok(())
                }
                None if line.trim_start().starts_with("***") => self.file_marker(line),
                None => Err(unexpected("an Add File line starting with '+'", line)),
            },
            State::UpdateHeader { move_allowed } => {
                let classified = classify(marker);
                if let (true, Marker::MoveTo(to)) = (move_allowed, &classified) {
                    self.move_to(to)
                } else if marker.is_empty() {
                    // Codex skips blank lines before the first chunk.
                    Ok(())
                } else if line.starts_with("@@") {
                    self.chunk_header(line)
                } else if starts_chunk_line(line) {
                    // The first chunk of an update may omit its `@@`.
                    self.open_chunk(None);
                    self.chunk_line(line);
                    self.state = State::Chunk;
                    Ok(())
                } else if classified == Marker::Plain {
                    Err(unexpected(
                        "a chunk: '@@' or a line starting with ' ', '+' or '-'",
                        line,
                    ))
                } else if classified == Marker::Unknown {
                    Err(ParseErrorKind::UnknownMarker { found: quote(line) })
                } else if classified == Marker::EmptyPath {
                    Err(ParseErrorKind::EmptyPath { found: quote(line) })
                } else {
                    Err(ParseErrorKind::EmptyUpdate {
                        path: self.current_path().to_owned(),
                        found: quote(line),
                    })
                }
            }
            State::ChunkHeader => {
                if !starts_chunk_line(line) {
                    return Err(unexpected(EXPECT_CHUNK_LINE, line));
                }
                self.chunk_line(line);
                self.state = State::Chunk;
                Ok(())
            }
            State::Chunk => {
                if line.starts_with(char::is_whitespace) && marker.trim_start() == END_PATCH {
                    self.held.push(line.to_owned());
                    self.state = State::MaybeEnded;
                    Ok(())
                } else if starts_chunk_line(line) {
                    self.chunk_line(line);
                    Ok(())
                } else if line.starts_with("@@") {
                    self.chunk_header(line)
                } else if marker == END_OF_FILE {
                    if let Some(chunk) = self.current_chunk() {
                        chunk.end_of_file = true;
                    }
                    self.state = State::AfterEof;
                    Ok(())
                } else if line.starts_with("***") {
                    // Context lines start with ' ', so `***` in column 0 can only be a marker.
                    self.file_marker(line)
                } else {
                    Err(unexpected(EXPECT_CHUNK_LINE, line))
                }
            }
            State::AfterEof => {
                // No chunk line may follow `*** End of File`, so padding is unambiguous here.
                let trimmed = marker.trim_start();
                if trimmed.is_empty() {
                    Ok(())
                } else if trimmed.starts_with("@@") {
                    self.chunk_header(trimmed)
                } else if trimmed.starts_with("***") {
                    self.file_marker(trimmed)
                } else {
                    Err(unexpected(
                        "'@@' or a file marker after '*** End of File'",
                        line,
                    ))
                }
            }
            State::MaybeEnded => {
                let continues =
                    starts_chunk_line(line) || line.starts_with("@@") || line.starts_with("***");
                if marker.trim_start().is_empty() {
                    self.held.push(line.to_owned());
                } else if continues {
                    // The held line was context after all (and so were the blank lines).
                    self.state = State::Chunk;
                    for held in std::mem::take(&mut self.held) {
                        self.chunk_line(&held);
                    }
                    return self.step(line);
                } else {
                    self.end();
                    return self.step(line);
                }
                Ok(())
            }
            State::Ended => {
                let trimmed = marker.trim_start();
                match &self.heredoc {
                    _ if trimmed.is_empty() || self.ignore_after_end => {}
                    Some(delimiter) if trimmed == delimiter.as_str() => self.state = State::Closed,
                    Some(delimiter) => {
                        return Err(ParseErrorKind::MissingHeredocEnd {
                            delimiter: delimiter.clone(),
                            found: quote(line),
                        });
                    }
                    None => return Err(unexpected("nothing after '*** End Patch'", line)),
                }
                Ok(())
            }
            State::Closed if marker.trim_start().is_empty() => Ok(()),
            State::Closed => Err(unexpected("nothing after the heredoc", line)),
        }
    }

    /// A line where a file operation (or the end of the patch) must start.
    fn file_marker(&mut self, line: &str) -> Result<(), ParseErrorKind> {
        match classify(line.trim()) {
            Marker::File(kind, path) => {
                self.claim(path)?;
                let path = path.to_owned();
                if self.emit {
                    let event = StreamEvent::FileStarted {
                        path: path.clone(),
                        kind,
                    };
                    self.events.push(event);
                }
                let (op, state) = match kind {
                    OpKind::Add => (
                        FileOp::Add {
                            path,
                            lines: Vec::new(),
                        },
                        State::Add,
                    ),
                    OpKind::Delete => (FileOp::Delete { path }, State::Ops),
                    OpKind::Update => (
                        FileOp::Update {
                            path,
                            move_to: None,
                            chunks: Vec::new(),
                        },
                        State::UpdateHeader { move_allowed: true },
                    ),
                };
                self.ops.push(op);
                self.state = state;
                Ok(())
            }
            Marker::End if self.ops.is_empty() => Err(ParseErrorKind::NoOperations),
            Marker::End => {
                self.end();
                Ok(())
            }
            Marker::EmptyPath => Err(ParseErrorKind::EmptyPath { found: quote(line) }),
            Marker::Unknown => Err(ParseErrorKind::UnknownMarker { found: quote(line) }),
            Marker::Plain | Marker::Begin | Marker::EndOfFile | Marker::MoveTo(_) => {
                Err(unexpected(EXPECT_FILE_OP, line))
            }
        }
    }

    /// Records `path` as used by this patch; a second use is refused, since two operations on
    /// one path would depend on an order the engine does not promise.
    fn claim(&mut self, path: &str) -> Result<(), ParseErrorKind> {
        match self.paths.entry(path.to_owned()) {
            Entry::Occupied(first) => Err(ParseErrorKind::DuplicatePath {
                path: path.to_owned(),
                first_line: *first.get(),
            }),
            Entry::Vacant(slot) => {
                slot.insert(self.line_no);
                Ok(())
            }
        }
    }

    fn end(&mut self) {
        self.held.clear();
        self.state = State::Ended;
        if self.emit {
            self.events.push(StreamEvent::Ended);
        }
    }

    fn move_to(&mut self, to: &str) -> Result<(), ParseErrorKind> {
        self.claim(to)?;
        if let Some(FileOp::Update { path, move_to, .. }) = self.ops.last_mut() {
            *move_to = Some(to.to_owned());
            if self.emit {
                let event = StreamEvent::MovedTo {
                    path: path.clone(),
                    to: to.to_owned(),
                };
                self.events.push(event);
            }
        }
        self.state = State::UpdateHeader {
            move_allowed: false,
        };
        Ok(())
    }

    fn chunk_header(&mut self, line: &str) -> Result<(), ParseErrorKind> {
        let marker = line.trim_end();
        let context = if marker == "@@" {
            None
        } else if let Some(text) = marker.strip_prefix("@@ ") {
            Some(text.to_owned())
        } else {
            return Err(unexpected("'@@' or '@@ <context line>'", line));
        };
        self.open_chunk(context);
        self.state = State::ChunkHeader;
        Ok(())
    }

    fn open_chunk(&mut self, context: Option<String>) {
        if let Some(FileOp::Update { path, chunks, .. }) = self.ops.last_mut() {
            if self.emit {
                let event = StreamEvent::ChunkStarted {
                    path: path.clone(),
                    context: context.clone(),
                };
                self.events.push(event);
            }
            chunks.push(Chunk {
                context,
                ..Chunk::default()
            });
        }
    }

    /// Adds a line the caller checked with [`starts_chunk_line`] to the open chunk.
    fn chunk_line(&mut self, line: &str) {
        let (sign, text) = match line.split_at_checked(1) {
            Some((sign, text)) => (sign.chars().next().unwrap_or(' '), text),
            // An empty line inside a chunk is an empty context line whose space got lost.
            None => (' ', ""),
        };
        let Some(FileOp::Update { path, chunks, .. }) = self.ops.last_mut() else {
            return;
        };
        let Some(chunk) = chunks.last_mut() else {
            return;
        };
        if sign != '+' {
            chunk.old_lines.push(text.to_owned());
        }
        if sign != '-' {
            chunk.new_lines.push(text.to_owned());
        }
        if self.emit {
            let event = StreamEvent::Line {
                path: path.clone(),
                sign,
                text: text.to_owned(),
            };
            self.events.push(event);
        }
    }

    fn add_line(&mut self, text: &str) {
        if let Some(FileOp::Add { path, lines }) = self.ops.last_mut() {
            lines.push(text.to_owned());
            if self.emit {
                let event = StreamEvent::Line {
                    path: path.clone(),
                    sign: '+',
                    text: text.to_owned(),
                };
                self.events.push(event);
            }
        }
    }

    fn current_chunk(&mut self) -> Option<&mut Chunk> {
        match self.ops.last_mut() {
            Some(FileOp::Update { chunks, .. }) => chunks.last_mut(),
            _ => None,
        }
    }

    fn current_path(&self) -> &str {
        match self.ops.last() {
            Some(
                FileOp::Add { path, .. } | FileOp::Delete { path } | FileOp::Update { path, .. },
            ) => path,
            None => "",
        }
    }
}

/// ' ', '+', '-' or an empty line (an empty context line).
fn starts_chunk_line(line: &str) -> bool {
    line.is_empty() || line.starts_with([' ', '+', '-'])
}

fn classify(marker: &str) -> Marker<'_> {
    if !marker.starts_with("***") {
        return Marker::Plain;
    }
    match marker {
        BEGIN_PATCH => return Marker::Begin,
        END_PATCH => return Marker::End,
        END_OF_FILE => return Marker::EndOfFile,
        _ => {}
    }
    let with_path = [
        (ADD_FILE, Some(OpKind::Add)),
        (DELETE_FILE, Some(OpKind::Delete)),
        (UPDATE_FILE, Some(OpKind::Update)),
        (MOVE_TO, None),
    ];
    for (prefix, kind) in with_path {
        let Some(rest) = marker.strip_prefix(prefix) else {
            continue;
        };
        // `marker` is trimmed at the end, so "*** Add File: " arrives here as "*** Add File:".
        if rest.trim().is_empty() {
            return Marker::EmptyPath;
        }
        // Extra spaces before the path are padding too: no path starts with a space.
        let Some(path) = rest.strip_prefix(' ').map(str::trim_start) else {
            return Marker::Unknown;
        };
        return match kind {
            Some(kind) => Marker::File(kind, path),
            None => Marker::MoveTo(path),
        };
    }
    Marker::Unknown
}

/// The delimiter of a heredoc opener such as `apply_patch <<'EOF'`, `<<EOF` or `<<"EOF"`:
/// models calling `apply_patch` through a shell-less exec wrap the patch that way.
fn heredoc_delimiter(line: &str) -> Option<&str> {
    let line = line
        .strip_prefix("apply_patch")
        .map_or(line, str::trim_start);
    let rest = line.strip_prefix("<<")?.trim_start();
    let word = if let Some(quoted) = rest.strip_prefix('\'') {
        quoted.strip_suffix('\'')?
    } else if let Some(quoted) = rest.strip_prefix('"') {
        quoted.strip_suffix('"')?
    } else {
        rest
    };
    let is_word = !word.is_empty() && word.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    is_word.then_some(word)
}

fn unexpected(expected: &'static str, line: &str) -> ParseErrorKind {
    ParseErrorKind::Unexpected {
        expected,
        found: quote(line),
    }
}

fn unexpected_end(expected: &'static str) -> ParseErrorKind {
    ParseErrorKind::Unexpected {
        expected,
        found: END_OF_INPUT.to_owned(),
    }
}

/// `line` in single quotes, cut at [`MAX_QUOTE_CHARS`] so one huge line cannot flood a message.
fn quote(line: &str) -> String {
    format!("'{}'", shorten(line))
}

fn shorten(text: &str) -> String {
    match text.char_indices().nth(MAX_QUOTE_CHARS) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_owned(),
    }
}

// ---- aider SEARCH/REPLACE ----

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SrMarker {
    Search,
    Divider,
    Replace,
}

/// aider's markers: 5 to 9 of '<', '=' or '>' (models miscount), with trailing spaces allowed.
fn sr_marker(line: &str) -> Option<SrMarker> {
    let line = line.trim_end();
    let (marker, kind, tails): (char, SrMarker, &[&str]) = match line.chars().next()? {
        '<' => ('<', SrMarker::Search, &[" SEARCH", " SEARCH>"]),
        '=' => ('=', SrMarker::Divider, &[""]),
        '>' => ('>', SrMarker::Replace, &[" REPLACE"]),
        _ => return None,
    };
    let tail = line.trim_start_matches(marker);
    let run = line.len() - tail.len();
    ((5..=9).contains(&run) && tails.contains(&tail)).then_some(kind)
}

#[derive(Debug)]
struct SrBlock {
    search: Vec<String>,
    replace: Vec<String>,
}

/// Parses aider SEARCH/REPLACE blocks; prose and fences around them are ignored. Blocks of one
/// path become the chunks of one update, in order; a path whose blocks all have an empty SEARCH
/// is created. (An empty SEARCH next to other blocks of its path is an insertion at the end.)
pub(crate) fn parse_search_replace(text: &str) -> Result<Patch, ParseError> {
    let lines: Vec<&str> = text.lines().collect();
    let mut files: Vec<(String, Vec<SrBlock>)> = Vec::new();
    let mut index_of: HashMap<String, usize> = HashMap::new();
    let mut last_path: Option<String> = None;
    let mut i = 0;
    while i < lines.len() {
        match sr_marker(lines[i]) {
            Some(SrMarker::Search) => {}
            Some(SrMarker::Replace) => {
                return Err(ParseError {
                    line: i + 1,
                    kind: unexpected("'<<<<<<< SEARCH' before '>>>>>>> REPLACE'", lines[i]),
                });
            }
            Some(SrMarker::Divider) | None => {
                i += 1;
                continue;
            }
        }
        // aider reuses the previous block's path when a block names none.
        let path = sr_path(&lines[..i])
            .map(str::to_owned)
            .or_else(|| last_path.clone())
            .ok_or(ParseError {
                line: i + 1,
                kind: ParseErrorKind::MissingPath,
            })?;
        let (search, divider) = sr_section(&lines, i + 1, SrMarker::Divider, "'======='")?;
        let (replace, end) =
            sr_section(&lines, divider + 1, SrMarker::Replace, "'>>>>>>> REPLACE'")?;
        let slot = *index_of.entry(path.clone()).or_insert_with(|| {
            files.push((path.clone(), Vec::new()));
            files.len() - 1
        });
        files[slot].1.push(SrBlock { search, replace });
        last_path = Some(path);
        i = end + 1;
    }
    if files.is_empty() {
        return Err(ParseError {
            line: 1,
            kind: ParseErrorKind::NotAPatch,
        });
    }
    let ops = files
        .into_iter()
        .map(|(path, blocks)| {
            // A file only ever gets empty SEARCHes when it does not exist yet (aider's way to
            // create one); otherwise the blocks are chunks the matcher applies in order.
            if blocks.iter().all(|block| block.search.is_empty()) {
                let lines = blocks.into_iter().flat_map(|block| block.replace).collect();
                FileOp::Add { path, lines }
            } else {
                let chunks = blocks
                    .into_iter()
                    .map(|block| Chunk {
                        context: None,
                        old_lines: block.search,
                        new_lines: block.replace,
                        end_of_file: false,
                    })
                    .collect();
                FileOp::Update {
                    path,
                    move_to: None,
                    chunks,
                }
            }
        })
        .collect();
    Ok(Patch { ops })
}

/// Lines from `start` up to the `until` marker; returns them and the marker's index.
fn sr_section(
    lines: &[&str],
    start: usize,
    until: SrMarker,
    expected: &'static str,
) -> Result<(Vec<String>, usize), ParseError> {
    for (index, line) in lines.iter().enumerate().skip(start) {
        match sr_marker(line) {
            Some(marker) if marker == until => {
                let body = lines[start..index]
                    .iter()
                    .map(|line| (*line).to_owned())
                    .collect();
                return Ok((body, index));
            }
            // A stray marker means the block structure is broken; guessing would corrupt files.
            Some(_) => {
                return Err(ParseError {
                    line: index + 1,
                    kind: unexpected(expected, line),
                });
            }
            None => {}
        }
    }
    Err(ParseError {
        line: lines.len() + 1,
        kind: unexpected_end(expected),
    })
}

/// The path written above a SEARCH marker, as aider finds it: the nearest line that is not a
/// fence (or a fence with the path glued on, "```src/a.rs"), stripped of Markdown decoration.
fn sr_path<'a>(before: &[&'a str]) -> Option<&'a str> {
    for line in before.iter().rev().take(PATH_LOOKBACK) {
        let line = line.trim();
        if let Some(info) = line.strip_prefix("```") {
            let candidate = clean_path(info);
            if candidate.contains(['.', '/']) {
                return Some(candidate);
            }
            continue;
        }
        let candidate = clean_path(line);
        // Prose ("Change the parser:") has spaces; a path line in aider output does not.
        let is_path = !candidate.is_empty() && !candidate.contains(char::is_whitespace);
        return is_path.then_some(candidate);
    }
    None
}

fn clean_path(line: &str) -> &str {
    line.trim()
        .trim_end_matches(':')
        .trim_start_matches('#')
        .trim()
        .trim_matches(['`', '*'])
        .trim_end_matches(':')
        .trim()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(lines: &[&str]) -> Vec<String> {
        lines.iter().map(|line| (*line).to_owned()).collect()
    }

    fn chunk(context: Option<&str>, old: &[&str], new: &[&str], end_of_file: bool) -> Chunk {
        Chunk {
            context: context.map(str::to_owned),
            old_lines: strings(old),
            new_lines: strings(new),
            end_of_file,
        }
    }

    fn update(path: &str, chunks: Vec<Chunk>) -> FileOp {
        FileOp::Update {
            path: path.to_owned(),
            move_to: None,
            chunks,
        }
    }

    fn err(text: &str) -> ParseError {
        parse_patch(text).expect_err("the patch should be refused")
    }

    const FULL: &str = "*** Begin Patch
*** Add File: path/new.rs
+line one
+line two
*** Delete File: path/old.rs
*** Update File: path/a.rs
*** Move to: path/b.rs
@@ fn some_context()
 context line
-removed line
+added line
@@
-last
+final
*** End of File
*** End Patch
";

    fn full_ops() -> Vec<FileOp> {
        vec![
            FileOp::Add {
                path: "path/new.rs".into(),
                lines: strings(&["line one", "line two"]),
            },
            FileOp::Delete {
                path: "path/old.rs".into(),
            },
            FileOp::Update {
                path: "path/a.rs".into(),
                move_to: Some("path/b.rs".into()),
                chunks: vec![
                    chunk(
                        Some("fn some_context()"),
                        &["context line", "removed line"],
                        &["context line", "added line"],
                        false,
                    ),
                    chunk(None, &["last"], &["final"], true),
                ],
            },
        ]
    }

    #[test]
    fn parses_every_operation_of_the_grammar() {
        assert_eq!(parse_patch(FULL).unwrap().ops, full_ops());
    }

    #[test]
    fn tolerates_surrounding_whitespace_crlf_and_carriage_returns_on_markers() {
        let padded = format!("\n\n   {FULL}\n  \n\t\n");
        assert_eq!(parse_patch(&padded).unwrap().ops, full_ops());
        let crlf = FULL.replace('\n', "\r\n");
        assert_eq!(parse_patch(&crlf).unwrap().ops, full_ops());
        let cr_markers = FULL
            .replace("*** End Patch\n", "*** End Patch\r")
            .replace("@@\n", "@@ \n");
        assert_eq!(parse_patch(&cr_markers).unwrap().ops, full_ops());
    }

    #[test]
    fn unwraps_heredocs() {
        for opener in [
            "<<EOF",
            "<<'EOF'",
            "<<\"EOF\"",
            "apply_patch <<'EOF'",
            "  apply_patch <<EOF",
        ] {
            let text = format!("{opener}\n{FULL}EOF\n");
            assert_eq!(parse_patch(&text).unwrap().ops, full_ops(), "{opener}");
        }
        let text = format!("apply_patch <<'PATCH'\n{FULL}PATCH");
        assert_eq!(parse_patch(&text).unwrap().ops, full_ops());

        let unclosed = format!("<<'EOF'\n{FULL}");
        let error = parse_patch(&unclosed).unwrap_err();
        assert_eq!(error.line, 18);
        assert!(
            matches!(error.kind, ParseErrorKind::MissingHeredocEnd { .. }),
            "{error}"
        );
        let error = parse_patch(&format!("<<'EOF'\n{FULL}EOF\nmore")).unwrap_err();
        assert_eq!(error.line, 19);
        let error = parse_patch(&format!("{FULL}EOF\n")).unwrap_err();
        assert_eq!(
            error.to_string(),
            "patch line 17: expected nothing after '*** End Patch', found 'EOF'"
        );
    }

    #[test]
    fn first_chunk_may_omit_its_header_and_empty_lines_are_context() {
        let text = concat!(
            "*** Begin Patch\n*** Update File: a.py\n\n import foo\n\n+bar\n",
            "@@ def f():\n-x\n+y\n\n*** End Patch",
        );
        let ops = parse_patch(text).unwrap().ops;
        assert_eq!(
            ops,
            vec![update(
                "a.py",
                vec![
                    chunk(None, &["import foo", ""], &["import foo", "", "bar"], false),
                    chunk(Some("def f():"), &["x", ""], &["y", ""], false),
                ]
            )]
        );
    }

    #[test]
    fn header_text_is_kept_as_written_and_a_bare_header_has_none() {
        let text = concat!(
            "*** Begin Patch\n*** Update File: a\n",
            "@@   indented ctx\n-a\n+b\n@@ \n-c\n*** End Patch",
        );
        let ops = parse_patch(text).unwrap().ops;
        assert_eq!(
            ops,
            vec![update(
                "a",
                vec![
                    chunk(Some("  indented ctx"), &["a"], &["b"], false),
                    chunk(None, &["c"], &[], false)
                ]
            )]
        );
    }

    #[test]
    fn an_add_file_may_be_empty_and_paths_are_returned_as_written() {
        let text =
            "*** Begin Patch\n*** Add File: ../odd path/x\n*** Delete File: /abs\n*** End Patch";
        assert_eq!(
            parse_patch(text).unwrap().ops,
            vec![
                FileOp::Add {
                    path: "../odd path/x".into(),
                    lines: vec![]
                },
                FileOp::Delete {
                    path: "/abs".into()
                }
            ]
        );
    }

    /// Markers padded the way models pad them, each where no content line could stand.
    const PADDED: &str = concat!(
        " *** Begin Patch\n",
        "  *** Add File: new.txt\n",
        "+hello\n",
        "  *** Delete File:   gone.txt  \n",
        "\t*** Update File: a.txt\n",
        "@@   \n",
        " keep\n",
        "-old\n",
        "+new\n",
        "*** End of File   \n",
        "   @@ fn tail()\n",
        "-x\n",
        " *** End Patch\n",
    );

    #[test]
    fn padded_markers_are_read_where_they_are_unambiguous() {
        let ops = parse_patch(PADDED).unwrap().ops;
        assert_eq!(
            ops,
            vec![
                FileOp::Add {
                    path: "new.txt".into(),
                    lines: vec!["hello".into()]
                },
                FileOp::Delete {
                    path: "gone.txt".into()
                },
                update(
                    "a.txt",
                    vec![
                        chunk(None, &["keep", "old"], &["keep", "new"], true),
                        chunk(Some("fn tail()"), &["x"], &[], false),
                    ]
                ),
            ]
        );
        // The same inside a heredoc and inside prose: the padded end still ends the patch.
        assert_eq!(
            parse_patch(&format!("<<'EOF'\n{PADDED}EOF\n")).unwrap().ops,
            ops
        );
        let prose = format!("Here you go:\n```\n{PADDED}```\nDone.");
        assert_eq!(parse_any(&prose).unwrap().ops, ops);
    }

    #[test]
    fn a_padded_end_line_followed_by_chunk_lines_is_context() {
        // ` *** End Patch` then more chunk lines: it was a context line all along.
        let text =
            "*** Begin Patch\n*** Update File: a\n x\n *** End Patch  \n\n \n-y\n*** End Patch\n";
        assert_eq!(
            parse_patch(text).unwrap().ops,
            vec![update(
                "a",
                vec![chunk(
                    None,
                    &["x", "*** End Patch  ", "", "", "y"],
                    &["x", "*** End Patch  ", "", ""],
                    false
                )]
            )]
        );
        // Followed by anything else, it ends the patch, and what follows is judged as usual.
        let error = parse_patch("*** Begin Patch\n*** Update File: a\n-x\n *** End Patch\nmore")
            .unwrap_err();
        assert_eq!(
            error.to_string(),
            "patch line 5: expected nothing after '*** End Patch', found 'more'"
        );
    }

    /// Whole inputs that must be refused: (text, line, code, part of the message).
    #[rustfmt::skip]
    const REFUSED: &[(&str, usize, &str, &str)] = &[
        ("", 1, "patch_syntax", "expected '*** Begin Patch', found end of input"),
        ("hello\n*** Begin Patch", 1, "patch_syntax", "expected '*** Begin Patch', found 'hello'"),
        ("*** Begin Patch\n*** Delete File: a\n", 3, "patch_syntax", "expected '*** End Patch'"),
        ("*** Begin Patch\n*** Delete File: a\n*** End Patch\nmore", 4, "patch_syntax", "'more'"),
        ("*** Begin Patch\n*** End Patch", 2, "patch_empty", "no file operation"),
    ];

    /// Bodies between `*** Begin Patch` (line 1) and `*** End Patch` that must be refused.
    #[rustfmt::skip]
    const REFUSED_BODIES: &[(&str, usize, &str, &str)] = &[
        ("*** Frobnicate File: a", 2, "patch_syntax", "unknown marker '*** Frobnicate File: a'"),
        ("*** Add File:a", 2, "patch_syntax", "unknown marker '*** Add File:a'"),
        ("*** Update File: a\n@@\n x\n*** Bogus", 5, "patch_syntax", "unknown marker '*** Bogus'"),
        ("*** Update File: a\n@@\n x\n\ty", 5, "patch_syntax",
            "expected a chunk line starting with ' ', '+' or '-', found '\ty'"),
        ("*** Update File: a", 3, "patch_syntax", "'*** Update File: a' has no chunk"),
        ("*** Update File: a\n\n*** Delete File: b", 4, "patch_syntax", "has no chunk"),
        ("*** Update File: a\nfoo", 3, "patch_syntax", "expected a chunk: '@@'"),
        ("*** Update File: a\n@@", 4, "patch_syntax", "expected a chunk line"),
        ("*** Update File: a\n@@\n@@\n-x", 4, "patch_syntax", "found '@@'"),
        ("*** Update File: a\n@@x\n-x", 3, "patch_syntax", "expected '@@' or '@@ <context line>'"),
        ("*** Update File: a\n-x\n*** End of File\n-y", 5, "patch_syntax", "'@@' or a file marker"),
        ("*** Update File: a\n-x\n*** Move to: b", 4, "patch_syntax", "found '*** Move to: b'"),
        ("*** Add File: a\n+x\ny", 4, "patch_syntax",
            "expected an Add File line starting with '+', found 'y'"),
        ("*** Add File: a\n+x\n", 4, "patch_syntax", "found ''"),
        ("*** Add File: ", 2, "patch_syntax", "missing path in '*** Add File: '"),
        ("*** Update File: a\n*** Move to:\n-x", 3, "patch_syntax", "missing path"),
        ("*** Delete File: a\n*** Add File: a", 3, "patch_duplicate_path",
            "path 'a' appears twice in one patch (first on line 2)"),
        ("*** Update File: a\n*** Move to: b\n-x\n*** Delete File: b", 5, "patch_duplicate_path",
            "first on line 3"),
        ("*** Begin Patch", 2, "patch_syntax", "found '*** Begin Patch'"),
        ("\n*** Delete File: a", 2, "patch_syntax", "found ''"),
    ];

    fn refused_texts() -> impl Iterator<Item = (String, usize, &'static str, &'static str)> {
        let whole = REFUSED
            .iter()
            .map(|&(text, line, code, message)| (text.to_owned(), line, code, message));
        let bodies = REFUSED_BODIES.iter().map(|&(body, line, code, message)| {
            (
                format!("*** Begin Patch\n{body}\n*** End Patch\n"),
                line,
                code,
                message,
            )
        });
        whole.chain(bodies)
    }

    #[test]
    fn refuses_malformed_patches_naming_line_and_text() {
        for (text, line, code, message) in refused_texts() {
            let error = err(&text);
            let shown = error.to_string();
            assert_eq!(
                (error.line, error.code()),
                (line, code),
                "{text:?}: {shown}"
            );
            assert!(
                shown.starts_with(&format!("patch line {line}: ")),
                "{shown}"
            );
            assert!(shown.contains(message), "{text:?}: {shown}");
        }
    }

    #[test]
    fn long_lines_are_quoted_shortened() {
        let long = "x".repeat(500);
        let error = err(&format!(
            "*** Begin Patch\n*** Add File: a\n{long}\n*** End Patch"
        ));
        let shown = error.to_string();
        assert!(
            shown.contains(&format!("'{}…'", "x".repeat(MAX_QUOTE_CHARS))),
            "{shown}"
        );
        assert!(shown.len() < 250, "{shown}");
    }

    #[test]
    fn parses_a_megabyte_patch() {
        let mut text = String::from("*** Begin Patch\n");
        let mut files = 0;
        while text.len() < 1 << 20 {
            text.push_str(&format!(
                "*** Update File: src/f{files}.rs\n@@ fn f{files}()\n"
            ));
            for line in 0..20 {
                text.push_str(&format!(
                    " context {line} of file {files}, padded to look like code\n"
                ));
                text.push_str(&format!("-old {line}\n+new {line}\n"));
            }
            text.push_str(&format!("*** Add File: src/g{files}.rs\n+fn g() {{}}\n"));
            files += 1;
        }
        text.push_str("*** End Patch\n");
        let ops = parse_patch(&text).unwrap().ops;
        assert_eq!(ops.len(), 2 * files);
        let FileOp::Update { chunks, .. } = &ops[ops.len() - 2] else {
            panic!("not an update")
        };
        assert_eq!(chunks[0].old_lines.len(), 40);
        assert_eq!(chunks[0].new_lines[39], "new 19");
    }

    fn stream(text: &str, cuts: &[usize]) -> (Vec<StreamEvent>, Result<Patch, ParseError>) {
        let mut parser = StreamingParser::new();
        let mut events = Vec::new();
        let mut from = 0;
        for &cut in cuts.iter().chain([text.len()].iter()) {
            events.extend(parser.push(&text[from..cut]));
            from = cut;
        }
        (events, parser.finish())
    }

    fn stream_samples() -> Vec<String> {
        let mut samples = vec![
            FULL.to_owned(),
            FULL.replace('\n', "\r\n"),
            format!("apply_patch <<'EOF'\n{FULL}EOF"),
            "*** Begin Patch\n*** Update File: ünï/cödé.rs\n héllo — “quoted”\n-ß\n+ẞ\n*** End Patch"
                .to_owned(),
            "*** Begin Patch\n*** Add File: a\n+x\ny\n*** End Patch\n".to_owned(),
            "*** Begin Patch\n*** Update File: a\n@@\n x".to_owned(),
            "\n  *** Begin Patch\n*** Delete File: a\n*** End Patch\n\n".to_owned(),
            PADDED.to_owned(),
            "*** Begin Patch\n*** Update File: a\n x\n *** End Patch  \n\n \n-y\n*** End Patch\n"
                .to_owned(),
        ];
        samples.extend(refused_texts().map(|(text, ..)| text));
        samples
    }

    #[test]
    fn streaming_matches_parse_patch_at_every_split() {
        for text in stream_samples() {
            let expected = parse_patch(&text);
            let (whole_events, whole) = stream(&text, &[]);
            assert_eq!(whole, expected, "{text:?}");
            for cut in (0..=text.len()).filter(|&i| text.is_char_boundary(i)) {
                let (events, result) = stream(&text, &[cut]);
                assert_eq!(result, expected, "{text:?} cut at {cut}");
                assert_eq!(events, whole_events, "{text:?} cut at {cut}");
            }
        }
    }

    #[test]
    fn streaming_matches_parse_patch_for_random_multi_splits() {
        let mut seed = 0x9E37_79B9_7F4A_7C15_u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for text in stream_samples() {
            let expected = parse_patch(&text);
            let (whole_events, _) = stream(&text, &[]);
            for _ in 0..200 {
                let mut cuts: Vec<usize> = (0..next() % 12)
                    .map(|_| (next() % (text.len() as u64 + 1)) as usize)
                    .filter(|&i| text.is_char_boundary(i))
                    .collect();
                cuts.sort_unstable();
                let (events, result) = stream(&text, &cuts);
                assert_eq!(result, expected, "{text:?} {cuts:?}");
                assert_eq!(events, whole_events, "{text:?} {cuts:?}");
            }
        }
    }

    #[test]
    fn streaming_emits_each_line_once_it_is_complete() {
        let mut parser = StreamingParser::new();
        assert_eq!(parser.push("*** Begin Patch\n*** Upd"), vec![]);
        assert_eq!(
            parser.push("ate File: a.rs\n*** Move to: b.rs\n@@ fn x\n-ol"),
            vec![
                StreamEvent::FileStarted {
                    path: "a.rs".into(),
                    kind: OpKind::Update
                },
                StreamEvent::MovedTo {
                    path: "a.rs".into(),
                    to: "b.rs".into()
                },
                StreamEvent::ChunkStarted {
                    path: "a.rs".into(),
                    context: Some("fn x".into())
                },
            ]
        );
        assert_eq!(
            parser.push("d\n+new\n*** End Patch\n"),
            vec![
                StreamEvent::Line {
                    path: "a.rs".into(),
                    sign: '-',
                    text: "old".into()
                },
                StreamEvent::Line {
                    path: "a.rs".into(),
                    sign: '+',
                    text: "new".into()
                },
                StreamEvent::Ended,
            ]
        );
        assert_eq!(parser.finish().unwrap().ops.len(), 1);

        let mut parser = StreamingParser::new();
        let events = parser.push("*** Begin Patch\n*** Add File: n\n+x\nbad\n+y\n");
        assert_eq!(events.len(), 2, "{events:?}");
        assert_eq!(parser.push("*** Add File: m\n"), vec![]);
        assert_eq!(parser.finish().unwrap_err().line, 4);
    }

    const SEARCH_REPLACE: &str = "Here is the change.

src/app.py
```python
<<<<<<< SEARCH
def f():
    return 1
=======
def f():
    return 2
>>>>>>> REPLACE
```

And another one in the same file:

```python
<<<<<<< SEARCH
x = 1
=======
x = 2
>>>>>>> REPLACE
```

```src/new.py
<<<<<<< SEARCH
=======
print('hi')
>>>>>>> REPLACE
```
";

    #[test]
    fn parses_search_replace_blocks() {
        let ops = parse_search_replace(SEARCH_REPLACE).unwrap().ops;
        assert_eq!(
            ops,
            vec![
                update(
                    "src/app.py",
                    vec![
                        chunk(
                            None,
                            &["def f():", "    return 1"],
                            &["def f():", "    return 2"],
                            false
                        ),
                        chunk(None, &["x = 1"], &["x = 2"], false),
                    ]
                ),
                FileOp::Add {
                    path: "src/new.py".into(),
                    lines: strings(&["print('hi')"])
                },
            ]
        );
        assert_eq!(parse_any(SEARCH_REPLACE).unwrap().ops, ops);
    }

    #[test]
    fn search_replace_paths_are_found_like_aider() {
        let decorated = "**`lib/a.rs`**:\n<<<<<<< SEARCH\na\n=======\nb\n>>>>>>> REPLACE\n";
        assert_eq!(
            parse_search_replace(decorated).unwrap().ops,
            vec![update("lib/a.rs", vec![chunk(None, &["a"], &["b"], false)])]
        );
        let heading = "### lib/b.rs\n```\n<<<<<<<< SEARCH\na\n========\n>>>>>>>> REPLACE\n```";
        assert_eq!(
            parse_search_replace(heading).unwrap().ops,
            vec![update("lib/b.rs", vec![chunk(None, &["a"], &[], false)])]
        );
        // An empty SEARCH next to other blocks of its path appends to the existing file.
        let mixed = concat!(
            "a.txt\n<<<<<<< SEARCH\nx\n=======\ny\n>>>>>>> REPLACE\n",
            "<<<<<<< SEARCH\n=======\nz\n>>>>>>> REPLACE",
        );
        assert_eq!(
            parse_search_replace(mixed).unwrap().ops,
            vec![update(
                "a.txt",
                vec![
                    chunk(None, &["x"], &["y"], false),
                    chunk(None, &[], &["z"], false)
                ]
            )]
        );
    }

    #[test]
    fn refuses_broken_search_replace() {
        #[rustfmt::skip]
        let cases: &[(&str, usize, &str, &str)] = &[
            ("Change it:\n<<<<<<< SEARCH\na\n=======\nb\n>>>>>>> REPLACE", 2, "patch_syntax",
                "without a file path"),
            ("a.rs\n<<<<<<< SEARCH\na\n>>>>>>> REPLACE", 4, "patch_syntax",
                "expected '=======', found '>>>>>>> REPLACE'"),
            ("a.rs\n<<<<<<< SEARCH\na\n=======\nb\n", 6, "patch_syntax",
                "expected '>>>>>>> REPLACE', found end of input"),
            ("a.rs\n<<<<<<< SEARCH\na\n=======\nb\n=======\n>>>>>>> REPLACE", 6, "patch_syntax",
                "found '======='"),
            ("a.rs\n>>>>>>> REPLACE", 2, "patch_syntax", "found '>>>>>>> REPLACE'"),
            ("just prose", 1, "patch_not_found", "no '*** Begin Patch' or '<<<<<<< SEARCH' found"),
        ];
        for &(text, line, code, message) in cases {
            let error = parse_search_replace(text).unwrap_err();
            let shown = error.to_string();
            assert_eq!(
                (error.line, error.code()),
                (line, code),
                "{text:?}: {shown}"
            );
            assert!(shown.contains(message), "{text:?}: {shown}");
        }
    }

    #[test]
    fn parse_any_detects_the_format() {
        assert_eq!(parse_any(FULL).unwrap().ops, full_ops());
        assert_eq!(
            parse_any(&format!("<<'EOF'\n{FULL}EOF")).unwrap().ops,
            full_ops()
        );
        let prose =
            format!("I'll make the change.\n\n```\n{FULL}```\nDone — tell me if you want more.");
        assert_eq!(parse_any(&prose).unwrap().ops, full_ops());
        let broken = "Sure:\n*** Begin Patch\n*** Update File: a\n*** End Patch\nbye";
        let error = parse_any(broken).unwrap_err();
        assert_eq!(error.line, 4, "{error}");
        let error = parse_any("nothing here").unwrap_err();
        assert_eq!((error.line, error.code()), (1, "patch_not_found"));
    }
}
