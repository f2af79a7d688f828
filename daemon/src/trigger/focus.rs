//! The code a `spark!` comment is about: the block that encloses it, found by indentation
//! (which every language here is written with, whatever its block syntax), or the comment's
//! surrounding lines when nothing encloses it or that block is too long to be a focus.

/// A block longer than this is not "the code around the comment": the surrounding lines are
/// shown instead (the whole file still goes to the model; this only points at a place).
const MAX_BLOCK_LINES: usize = 200;
/// Lines either side of the comment when no enclosing block is used.
const SURROUNDING: usize = 20;
/// A tab counts as this many columns when indentations are compared.
const TAB_WIDTH: usize = 4;

/// Lines that close a block at the indentation of its header, and so belong to it.
const CLOSERS: &[&str] = &["}", ")", "]", "end", "fi", "done", "esac"];

/// The 0-based inclusive line range around the comment at `comment` in `lines`.
pub(crate) fn around(lines: &[&str], comment: usize) -> (usize, usize) {
    let last = lines.len().saturating_sub(1);
    let comment = comment.min(last);
    let surrounding = (
        comment.saturating_sub(SURROUNDING),
        (comment + SURROUNDING).min(last),
    );
    let own = indent(lines[comment]);
    let (start, header_indent) = if own > 0 {
        // The nearest line above that is indented less: the block's header.
        match (0..comment)
            .rev()
            .find(|&i| !blank(lines[i]) && indent(lines[i]) < own)
        {
            Some(h) => (h, indent(lines[h])),
            None => return surrounding,
        }
    } else {
        // A top-level comment is about the item that follows it.
        match (comment + 1..lines.len()).find(|&i| !blank(lines[i])) {
            Some(first) if indent(lines[first]) == 0 => (comment, 0),
            _ => return surrounding,
        }
    };
    let from = if own > 0 { comment + 1 } else { comment + 2 };
    let mut end = comment;
    for (i, line) in lines.iter().enumerate().skip(from.min(lines.len())) {
        if blank(line) {
            continue;
        }
        if indent(line) <= header_indent {
            let closes = CLOSERS.iter().any(|c| line.trim_start().starts_with(c));
            if closes {
                end = i;
            }
            break;
        }
        end = i;
    }
    if own == 0 {
        // The item's own first line.
        end = end.max(
            (comment + 1..lines.len())
                .find(|&i| !blank(lines[i]))
                .unwrap_or(comment),
        );
    }
    if end - start + 1 > MAX_BLOCK_LINES {
        return surrounding;
    }
    (start, end)
}

fn blank(line: &str) -> bool {
    line.trim().is_empty()
}

fn indent(line: &str) -> usize {
    line.chars()
        .take_while(|c| *c == ' ' || *c == '\t')
        .map(|c| if c == '\t' { TAB_WIDTH } else { 1 })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(text: &str) -> Vec<&str> {
        text.lines().collect()
    }

    #[test]
    fn an_indented_comment_focuses_its_enclosing_function() {
        let py = lines(
            "import os\n\ndef first(xs):\n    # handle the empty list spark!\n    y = xs[0]\n\n    return y\n\ndef other():\n    pass\n",
        );
        assert_eq!(around(&py, 3), (2, 6));
        let rs = lines(
            "use x;\n\nfn f() {\n    let a = 1;\n    // make it async spark!\n    g(a);\n}\n\nfn h() {}\n",
        );
        assert_eq!(around(&rs, 4), (2, 6));
        // Nested: the innermost block.
        let js = lines("class A {\n  m() {\n    // here spark!\n    return 1;\n  }\n}\n");
        assert_eq!(around(&js, 2), (1, 4));
    }

    #[test]
    fn a_top_level_comment_focuses_the_item_after_it() {
        let go = lines(
            "package a\n\n// add a doc comment spark!\nfunc F() int {\n\treturn 1\n}\n\nfunc G() {}\n",
        );
        assert_eq!(around(&go, 2), (2, 5));
        let py = lines("# cache this spark!\nx = compute()\ny = 2\n");
        assert_eq!(around(&py, 0), (0, 1));
    }

    #[test]
    fn without_a_block_the_surrounding_lines_are_the_focus() {
        // Indented with nothing enclosing it (a fragment, a YAML list).
        let text: Vec<String> = (0..100).map(|i| format!("    x{i} = {i}")).collect();
        let mut lines: Vec<&str> = text.iter().map(String::as_str).collect();
        lines[50] = "    # spark!";
        assert_eq!(around(&lines, 50), (30, 70));
        // An oversized block falls back too.
        let mut big = vec!["def f():".to_owned()];
        big.extend((0..300).map(|i| format!("    x = {i}")));
        big.insert(150, "    # here spark!".to_owned());
        let big: Vec<&str> = big.iter().map(String::as_str).collect();
        assert_eq!(around(&big, 150), (130, 170));
    }
}
