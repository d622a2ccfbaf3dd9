//! Lexer and parser for the subset of PTX that nvcc emits: module directives, kernel
//! entries with `.param` lists, `.reg`/`.shared`/`.local` declarations, labels, `{ }`
//! scopes (inline asm), predicated instructions and their operands. The result is a
//! syntax tree ([`ModuleAst`]) that [`crate::ir`] decodes into executable instructions.

use crate::error::Error;

/// A lexical token with the 1-based source line it starts on.
#[derive(Debug, Clone, PartialEq)]
enum Tok {
    /// Identifiers, opcodes, directives, registers, labels: any run of
    /// `[A-Za-z0-9_$%.]` (plus `::`) that does not start with a digit.
    Word(String),
    /// A numeric literal as written (`16`, `0x1F`, `0f3F800000`, `1.5`).
    Num(String),
    /// Punctuation.
    P(char),
}

fn lex(src: &str) -> Result<Vec<(Tok, u32)>, Error> {
    let b = src.as_bytes();
    let mut out = Vec::new();
    let (mut i, mut line) = (0usize, 1u32);
    let is_word = |c: u8| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'$' | b'%' | b'.');
    while i < b.len() {
        let c = b[i];
        match c {
            b'\n' => {
                line += 1;
                i += 1;
            }
            c if c.is_ascii_whitespace() => i += 1,
            b'/' if b.get(i + 1) == Some(&b'/') => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                i += 2;
                while i < b.len() && !(b[i] == b'*' && b.get(i + 1) == Some(&b'/')) {
                    if b[i] == b'\n' {
                        line += 1;
                    }
                    i += 1;
                }
                i += 2;
            }
            b'"' => {
                // String literals only appear in directives we skip (e.g. `.file`).
                i += 1;
                while i < b.len() && b[i] != b'"' {
                    i += 1;
                }
                i += 1;
                out.push((Tok::Word("\"str\"".into()), line));
            }
            c if c.is_ascii_digit() => {
                let s = i;
                while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'.') {
                    i += 1;
                }
                out.push((Tok::Num(src[s..i].to_string()), line));
            }
            c if is_word(c) => {
                let s = i;
                while i < b.len() {
                    if is_word(b[i]) {
                        i += 1;
                    } else if b[i] == b':' && b.get(i + 1) == Some(&b':') {
                        i += 2;
                    } else {
                        break;
                    }
                }
                out.push((Tok::Word(src[s..i].to_string()), line));
            }
            b'{' | b'}' | b'[' | b']' | b'(' | b')' | b',' | b';' | b':' | b'@' | b'!' | b'+'
            | b'-' | b'|' | b'<' | b'>' | b'=' => {
                out.push((Tok::P(c as char), line));
                i += 1;
            }
            _ => {
                return Err(Error::Parse {
                    line,
                    msg: format!("unexpected character {:?}", c as char),
                })
            }
        }
    }
    Ok(out)
}

/// One operand as written.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum OperandAst {
    /// A register, special register or symbol name (`%r1`, `%tid.x`, `smem`, `$L__BB0_1`).
    Name(String),
    /// `!%p1`.
    Not(String),
    /// A numeric literal (with its sign applied).
    Imm(Imm),
    /// `{a, b, ...}`; `_` elements are sinks.
    Vector(Vec<OperandAst>),
    /// `[base+offset]`.
    Address(Option<String>, i64),
    /// `%r1|%p1`.
    Pair(String, String),
}

/// A literal: integers keep their value, `0f`/`0d` literals their IEEE bits.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Imm {
    Int(i64),
    F32(u32),
    F64(u64),
}

/// One instruction as written.
#[derive(Debug, Clone)]
pub(crate) struct InstrAst {
    pub guard: Option<(String, bool)>,
    pub opcode: String,
    pub operands: Vec<OperandAst>,
    pub line: u32,
}

/// A statement inside a kernel body.
#[derive(Debug, Clone)]
pub(crate) enum Stmt {
    Label(String),
    Instr(InstrAst),
    /// `.reg .type name` or `name<count>` declarations (`pred`: of type `.pred`).
    Reg {
        pred: bool,
        names: Vec<String>,
    },
    /// A `.shared`, `.local` or `.global` variable.
    Var(VarDecl),
    ScopeOpen,
    ScopeClose,
}

/// A variable declaration (`.shared .align 16 .b8 buf[4096];`).
#[derive(Debug, Clone)]
pub(crate) struct VarDecl {
    pub space: String,
    pub name: String,
    pub align: u64,
    pub size: u64,
    pub extern_: bool,
    pub line: u32,
    /// Initial bytes (little-endian elements; shorter than `size` means zero-filled);
    /// `None` if the initializer holds something other than numbers (e.g. addresses).
    pub init: Option<Vec<u8>>,
}

/// A `.param` declaration of an entry.
#[derive(Debug, Clone)]
pub(crate) struct ParamAst {
    pub name: String,
    pub ty: String,
    pub size: u64,
    pub align: u64,
}

/// A `.entry`.
#[derive(Debug, Clone)]
pub(crate) struct EntryAst {
    pub name: String,
    pub params: Vec<ParamAst>,
    pub body: Vec<Stmt>,
}

/// A parsed module.
#[derive(Debug, Clone, Default)]
pub(crate) struct ModuleAst {
    pub entries: Vec<EntryAst>,
    pub globals: Vec<VarDecl>,
    pub version: Option<String>,
    pub target: Option<String>,
}

struct P {
    t: Vec<(Tok, u32)>,
    i: usize,
}

fn type_size(ty: &str) -> Option<u64> {
    Some(match ty {
        ".b8" | ".u8" | ".s8" | ".pred" => 1,
        ".b16" | ".u16" | ".s16" | ".f16" | ".bf16" => 2,
        ".b32" | ".u32" | ".s32" | ".f32" | ".f16x2" | ".bf16x2" => 4,
        ".b64" | ".u64" | ".s64" | ".f64" => 8,
        ".b128" => 16,
        _ => return None,
    })
}

impl P {
    fn line(&self) -> u32 {
        self.t
            .get(self.i)
            .or(self.t.last())
            .map(|t| t.1)
            .unwrap_or(0)
    }
    fn err<T>(&self, msg: impl Into<String>) -> Result<T, Error> {
        Err(Error::Parse {
            line: self.line(),
            msg: msg.into(),
        })
    }
    fn peek(&self) -> Option<&Tok> {
        self.t.get(self.i).map(|t| &t.0)
    }
    fn next(&mut self) -> Option<Tok> {
        let t = self.t.get(self.i).map(|t| t.0.clone());
        self.i += 1;
        t
    }
    fn is_p(&self, c: char) -> bool {
        self.peek() == Some(&Tok::P(c))
    }
    fn eat_p(&mut self, c: char) -> bool {
        if self.is_p(c) {
            self.i += 1;
            true
        } else {
            false
        }
    }
    fn expect_p(&mut self, c: char) -> Result<(), Error> {
        if self.eat_p(c) {
            Ok(())
        } else {
            self.err(format!("expected '{c}', found {:?}", self.peek()))
        }
    }
    fn word(&mut self) -> Result<String, Error> {
        match self.next() {
            Some(Tok::Word(w)) => Ok(w),
            t => {
                self.i -= 1;
                self.err(format!("expected a name, found {t:?}"))
            }
        }
    }
    fn peek_word(&self) -> Option<&str> {
        match self.peek() {
            Some(Tok::Word(w)) => Some(w),
            _ => None,
        }
    }
    fn number(&mut self) -> Result<i64, Error> {
        let neg = self.eat_p('-');
        match self.next() {
            Some(Tok::Num(n)) => match parse_imm(&n) {
                Some(Imm::Int(v)) => Ok(if neg { v.wrapping_neg() } else { v }),
                _ => self.err(format!("expected an integer, found {n}")),
            },
            t => self.err(format!("expected a number, found {t:?}")),
        }
    }
    /// Skips the rest of the current source line (`.loc` / `.file` have no `;`).
    fn skip_line(&mut self) {
        let line = self.line();
        while self.i < self.t.len() && self.t[self.i].1 == line {
            self.i += 1;
        }
    }
    /// Skips to the end of the current statement (`;`), or over a balanced `{ }` block.
    fn skip_statement(&mut self) {
        let mut depth = 0i32;
        while let Some(t) = self.next() {
            match t {
                Tok::P('{') => depth += 1,
                Tok::P('}') => {
                    depth -= 1;
                    if depth <= 0 {
                        return;
                    }
                }
                Tok::P(';') if depth == 0 => return,
                _ => {}
            }
        }
    }
}

/// Parses a numeric literal: decimal, `0x` hex, `0b` binary, octal, `0f` (f32 bits),
/// `0d` (f64 bits), or a decimal float (stored as f64 bits). A trailing `U` is allowed.
pub(crate) fn parse_imm(s: &str) -> Option<Imm> {
    let t = s.trim_end_matches(['U', 'u']);
    if let Some(h) = t.strip_prefix("0f").or_else(|| t.strip_prefix("0F")) {
        return u32::from_str_radix(h, 16).ok().map(Imm::F32);
    }
    if let Some(h) = t.strip_prefix("0d").or_else(|| t.strip_prefix("0D")) {
        return u64::from_str_radix(h, 16).ok().map(Imm::F64);
    }
    if let Some(h) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        return u64::from_str_radix(h, 16).ok().map(|v| Imm::Int(v as i64));
    }
    if let Some(h) = t.strip_prefix("0b").or_else(|| t.strip_prefix("0B")) {
        return u64::from_str_radix(h, 2).ok().map(|v| Imm::Int(v as i64));
    }
    if t.contains('.') || t.contains('e') || t.contains('E') {
        return t.parse::<f64>().ok().map(|v| Imm::F64(v.to_bits()));
    }
    if t.len() > 1 && t.starts_with('0') {
        return u64::from_str_radix(&t[1..], 8)
            .ok()
            .map(|v| Imm::Int(v as i64));
    }
    t.parse::<u64>().ok().map(|v| Imm::Int(v as i64))
}

/// Parses PTX text into a syntax tree.
pub(crate) fn parse_module(src: &str) -> Result<ModuleAst, Error> {
    let mut p = P { t: lex(src)?, i: 0 };
    let mut m = ModuleAst::default();
    while let Some(tok) = p.peek().cloned() {
        match tok {
            Tok::Word(w) => match w.as_str() {
                ".version" => {
                    p.i += 1;
                    if let Some(Tok::Num(v)) = p.next() {
                        m.version = Some(v);
                    }
                }
                ".target" => {
                    p.i += 1;
                    m.target = Some(p.word()?);
                    while p.eat_p(',') {
                        p.word()?;
                    }
                }
                ".address_size" => {
                    p.i += 1;
                    let n = p.number()?;
                    if n != 64 {
                        return p.err("only .address_size 64 is supported");
                    }
                }
                ".visible" | ".weak" | ".extern" if is_func_ahead(&p) => {
                    p.skip_func();
                }
                ".func" => p.skip_func(),
                ".visible" | ".weak" | ".entry" => {
                    while p.peek_word() != Some(".entry") {
                        p.i += 1;
                        if p.peek().is_none() {
                            return p.err("expected .entry");
                        }
                    }
                    m.entries.push(parse_entry(&mut p)?);
                }
                ".shared" | ".global" | ".const" | ".extern" | ".local" => {
                    let d = parse_var(&mut p)?;
                    m.globals.push(d);
                }
                ".file" | ".loc" => p.skip_line(),
                ".section" | ".pragma" => p.skip_statement(),
                _ => return p.err(format!("unsupported module-level directive {w}")),
            },
            _ => return p.err(format!("unexpected token {tok:?} at module level")),
        }
    }
    Ok(m)
}

fn is_func_ahead(p: &P) -> bool {
    let mut j = p.i;
    while let Some((Tok::Word(w), _)) = p.t.get(j) {
        match w.as_str() {
            ".func" => return true,
            ".entry" => return false,
            _ => j += 1,
        }
    }
    false
}

impl P {
    /// Skips a `.func` declaration or definition (calls are unsupported and rejected
    /// when decoded).
    fn skip_func(&mut self) {
        let mut paren = 0i32;
        while let Some(t) = self.next() {
            match t {
                Tok::P('(') => paren += 1,
                Tok::P(')') => paren -= 1,
                Tok::P(';') if paren == 0 => return,
                Tok::P('{') if paren == 0 => {
                    self.i -= 1;
                    self.skip_statement();
                    return;
                }
                _ => {}
            }
        }
    }
}

fn parse_var(p: &mut P) -> Result<VarDecl, Error> {
    let line = p.line();
    let (mut space, mut align, mut ty, mut extern_) = (String::new(), 0u64, String::new(), false);
    loop {
        let w = p.word()?;
        match w.as_str() {
            ".extern" => extern_ = true,
            ".visible" | ".weak" | ".common" => {}
            ".shared" | ".global" | ".const" | ".local" => space = w,
            ".align" => align = p.number()? as u64,
            _ if type_size(&w).is_some() => ty = w,
            ".v2" | ".v4" => return p.err("vector-typed variables are not supported"),
            _ => {
                if space.is_empty() || ty.is_empty() {
                    return p.err(format!("malformed variable declaration near {w}"));
                }
                let elem = type_size(&ty).unwrap();
                let mut size = elem;
                if p.eat_p('[') {
                    if p.eat_p(']') {
                        size = 0;
                    } else {
                        size = elem * p.number()? as u64;
                        p.expect_p(']')?;
                    }
                }
                let mut init = Some(Vec::new());
                if p.eat_p('=') {
                    // A flat list of numeric literals, each stored as one element.
                    let mut bytes = Vec::new();
                    while !p.is_p(';') && p.peek().is_some() {
                        let neg = p.eat_p('-');
                        match p.next() {
                            Some(Tok::Num(n)) => match (parse_imm(&n), init.is_some()) {
                                (Some(Imm::Int(v)), true) => {
                                    let v = if neg { v.wrapping_neg() } else { v };
                                    bytes.extend_from_slice(&v.to_le_bytes()[..elem as usize]);
                                }
                                (Some(Imm::F32(b)), true) if elem == 4 => {
                                    let b = if neg { b ^ 0x8000_0000 } else { b };
                                    bytes.extend_from_slice(&b.to_le_bytes());
                                }
                                (Some(Imm::F64(b)), true) if elem == 8 => {
                                    let b = if neg { b ^ (1 << 63) } else { b };
                                    bytes.extend_from_slice(&b.to_le_bytes());
                                }
                                _ => init = None,
                            },
                            Some(Tok::P('{')) | Some(Tok::P('}')) | Some(Tok::P(',')) => {}
                            _ => init = None,
                        }
                    }
                    if let Some(i) = &mut init {
                        *i = bytes;
                    }
                    if size == 0 {
                        size = init.as_ref().map_or(0, |b| b.len() as u64);
                    }
                }
                p.expect_p(';')?;
                return Ok(VarDecl {
                    space,
                    name: w,
                    align: align.max(elem),
                    size,
                    extern_,
                    line,
                    init,
                });
            }
        }
    }
}

fn parse_entry(p: &mut P) -> Result<EntryAst, Error> {
    p.word()?; // .entry
    let name = p.word()?;
    let mut params = Vec::new();
    if p.eat_p('(') {
        while !p.eat_p(')') {
            if p.word()? != ".param" {
                return p.err("expected .param");
            }
            let (mut ty, mut align) = (String::new(), 0u64);
            let pname = loop {
                let w = p.word()?;
                match w.as_str() {
                    ".ptr" | ".global" | ".shared" | ".const" | ".local" => {}
                    ".align" => align = p.number()? as u64,
                    _ if type_size(&w).is_some() => ty = w,
                    _ => break w,
                }
            };
            let elem = type_size(&ty).ok_or_else(|| Error::Parse {
                line: p.line(),
                msg: format!("parameter {pname} has no type"),
            })?;
            let mut size = elem;
            if p.eat_p('[') {
                size = elem * p.number()? as u64;
                p.expect_p(']')?;
            }
            params.push(ParamAst {
                name: pname,
                ty,
                size,
                align: align.max(elem),
            });
            p.eat_p(',');
        }
    }
    // Performance directives (.maxntid, .reqntid, .minnctapersm, ...) before the body.
    while let Some(w) = p.peek_word() {
        if w.starts_with('.') {
            p.i += 1;
            while matches!(p.peek(), Some(Tok::Num(_)) | Some(Tok::P(','))) {
                p.i += 1;
            }
        } else {
            break;
        }
    }
    p.expect_p('{')?;
    let mut body = Vec::new();
    let mut depth = 1;
    while depth > 0 {
        let Some(t) = p.peek().cloned() else {
            return p.err(format!("unterminated body of {name}"));
        };
        match t {
            Tok::P('{') => {
                p.i += 1;
                depth += 1;
                body.push(Stmt::ScopeOpen);
            }
            Tok::P('}') => {
                p.i += 1;
                depth -= 1;
                if depth > 0 {
                    body.push(Stmt::ScopeClose);
                }
            }
            Tok::P('@') => body.push(Stmt::Instr(parse_instr(p)?)),
            Tok::Word(w) => {
                if p.t.get(p.i + 1).map(|t| &t.0) == Some(&Tok::P(':')) {
                    p.i += 2;
                    body.push(Stmt::Label(w));
                } else if w == ".reg" {
                    p.i += 1;
                    // Every register is a 64-bit slot; only predicates are told apart.
                    let pred = p.word()? == ".pred";
                    let mut names = Vec::new();
                    loop {
                        let n = p.word()?;
                        if p.eat_p('<') {
                            let c = p.number()?;
                            p.expect_p('>')?;
                            names.extend((0..c).map(|k| format!("{n}{k}")));
                        } else {
                            names.push(n);
                        }
                        if !p.eat_p(',') {
                            break;
                        }
                    }
                    p.expect_p(';')?;
                    body.push(Stmt::Reg { pred, names });
                } else if matches!(
                    w.as_str(),
                    ".shared" | ".local" | ".global" | ".const" | ".extern"
                ) {
                    body.push(Stmt::Var(parse_var(p)?));
                } else if matches!(w.as_str(), ".loc" | ".file") {
                    p.skip_line();
                } else if matches!(w.as_str(), ".pragma" | ".maxnreg") {
                    p.skip_statement();
                } else if w.starts_with('.') {
                    return p.err(format!("unsupported directive {w} in kernel body"));
                } else {
                    body.push(Stmt::Instr(parse_instr(p)?));
                }
            }
            t => return p.err(format!("unexpected {t:?} in kernel body")),
        }
    }
    Ok(EntryAst { name, params, body })
}

fn parse_instr(p: &mut P) -> Result<InstrAst, Error> {
    let line = p.line();
    let mut guard = None;
    if p.eat_p('@') {
        let neg = p.eat_p('!');
        guard = Some((p.word()?, neg));
    }
    let opcode = p.word()?;
    let mut operands = Vec::new();
    if !p.eat_p(';') {
        loop {
            operands.push(parse_operand(p)?);
            if p.eat_p(';') {
                break;
            }
            p.expect_p(',')?;
        }
    }
    Ok(InstrAst {
        guard,
        opcode,
        operands,
        line,
    })
}

fn parse_operand(p: &mut P) -> Result<OperandAst, Error> {
    if p.eat_p('{') {
        let mut v = Vec::new();
        loop {
            v.push(parse_operand(p)?);
            if p.eat_p('}') {
                return Ok(OperandAst::Vector(v));
            }
            p.expect_p(',')?;
        }
    }
    if p.eat_p('[') {
        let mut base = None;
        let mut off = 0i64;
        if let Some(w) = p.peek_word() {
            base = Some(w.to_string());
            p.i += 1;
        } else {
            off = p.number()?;
        }
        while !p.eat_p(']') {
            if p.eat_p('+') {
                off = off.wrapping_add(p.number()?);
            } else if p.eat_p('-') {
                off = off.wrapping_sub(p.number()?);
            } else {
                return p.err("malformed address expression");
            }
        }
        return Ok(OperandAst::Address(base, off));
    }
    if p.eat_p('!') {
        return Ok(OperandAst::Not(p.word()?));
    }
    let neg = p.eat_p('-');
    match p.next() {
        Some(Tok::Num(n)) => {
            let imm = parse_imm(&n).ok_or_else(|| Error::Parse {
                line: p.line(),
                msg: format!("bad literal {n}"),
            })?;
            Ok(OperandAst::Imm(match (imm, neg) {
                (Imm::Int(v), true) => Imm::Int(v.wrapping_neg()),
                (Imm::F32(b), true) => Imm::F32(b ^ 0x8000_0000),
                (Imm::F64(b), true) => Imm::F64(b ^ (1 << 63)),
                (i, false) => i,
            }))
        }
        Some(Tok::Word(w)) if !neg => {
            if p.eat_p('|') {
                let q = p.word()?;
                return Ok(OperandAst::Pair(w, q));
            }
            Ok(OperandAst::Name(w))
        }
        t => {
            p.i -= 1;
            p.err(format!("unexpected operand {t:?}"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literals() {
        assert_eq!(parse_imm("0f3F800000"), Some(Imm::F32(0x3F80_0000)));
        assert_eq!(
            parse_imm("0d3FF0000000000000"),
            Some(Imm::F64(0x3FF0_0000_0000_0000))
        );
        assert_eq!(parse_imm("0x1F"), Some(Imm::Int(31)));
        assert_eq!(parse_imm("42"), Some(Imm::Int(42)));
        assert_eq!(parse_imm("0"), Some(Imm::Int(0)));
    }

    #[test]
    fn parses_entry() {
        let src = ".version 9.0\n.target sm_80\n.address_size 64\n\
            .visible .entry k(.param .u64 k_param_0, .param .u32 k_param_1)\n{\n\
            .reg .b32 %r<3>;\n.reg .pred %p<2>;\n\
            ld.param.u32 %r1, [k_param_1];\n@!%p1 bra $L__BB0_1;\n\
            $L__BB0_1:\n\tmov.b32 {%r1, _}, %r2;\n\tret;\n}\n";
        let m = parse_module(src).unwrap();
        let e = &m.entries[0];
        assert_eq!(e.name, "k");
        assert_eq!(e.params.len(), 2);
        assert_eq!(e.body.len(), 7);
    }
}
