//! Subscription rules: correlation filters, the small SQL filter subset the bus understands, and
//! rule actions (`SET` / `REMOVE`). SQL is parsed when the topology is loaded, so a subscription
//! whose expression the bus cannot evaluate faithfully fails at start-up, never silently at send.
//!
//! Supported SQL: literals (`'text'` with `''` escaping, integers, decimals, `TRUE`, `FALSE`),
//! `sys.<Property>` (MessageId, CorrelationId, Label/Subject, To, ReplyTo, ReplyToSessionId,
//! SessionId, ContentType), application properties (`name`, `user.name`, `[odd name]`),
//! `= <> != < <= > >=`, `IS [NOT] NULL`, `AND`, `OR`, `NOT` and parentheses, with SQL's
//! three-valued logic (a missing property compares as unknown, and unknown never matches).
//! Application property names match case-insensitively when no exact match exists, because
//! names sent over HTTP arrive lower-cased.

use serde_json::Value;
use std::collections::BTreeMap;
use std::fmt;

/// A broker ("system") property a filter or action can name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SystemProperty {
    MessageId,
    CorrelationId,
    Label,
    To,
    ReplyTo,
    ReplyToSessionId,
    SessionId,
    ContentType,
}

impl SystemProperty {
    fn parse(name: &str) -> Option<SystemProperty> {
        Some(match name.to_ascii_lowercase().as_str() {
            "messageid" => SystemProperty::MessageId,
            "correlationid" => SystemProperty::CorrelationId,
            "label" | "subject" => SystemProperty::Label,
            "to" => SystemProperty::To,
            "replyto" => SystemProperty::ReplyTo,
            "replytosessionid" => SystemProperty::ReplyToSessionId,
            "sessionid" => SystemProperty::SessionId,
            "contenttype" => SystemProperty::ContentType,
            _ => return None,
        })
    }
}

/// Read access to what a filter looks at.
pub(crate) trait FilterFields {
    fn system(&self, p: SystemProperty) -> Option<&str>;
    fn properties(&self) -> &BTreeMap<String, Value>;

    /// An application property, exact name first, else case-insensitively.
    fn property(&self, name: &str) -> Option<&Value> {
        property_key(self.properties(), name).and_then(|k| self.properties().get(k))
    }
}

/// The stored name of application property `name`: the exact name first, else one that differs
/// only in case (names sent over HTTP arrive lower-cased; AMQP senders keep theirs).
fn property_key<'a>(props: &'a BTreeMap<String, Value>, name: &str) -> Option<&'a str> {
    props.get_key_value(name).or_else(|| props.iter().find(|(k, _)| k.eq_ignore_ascii_case(name))).map(|(k, _)| k.as_str())
}

/// Write access for rule actions.
pub(crate) trait ActionFields: FilterFields {
    fn set_system(&mut self, p: SystemProperty, value: Option<String>);
    fn properties_mut(&mut self) -> &mut BTreeMap<String, Value>;
}

/// A correlation filter: every field that is set must equal the message's (strings compare
/// exactly); every entry of `properties` must be present with an equal value.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CorrelationFilter {
    pub content_type: Option<String>,
    pub correlation_id: Option<String>,
    pub label: Option<String>,
    pub message_id: Option<String>,
    pub reply_to: Option<String>,
    pub reply_to_session_id: Option<String>,
    pub session_id: Option<String>,
    pub to: Option<String>,
    pub properties: BTreeMap<String, Value>,
}

impl CorrelationFilter {
    /// The usual deploychain filter: the message's Label (Subject) equals `label`.
    pub fn label(label: impl Into<String>) -> CorrelationFilter {
        CorrelationFilter { label: Some(label.into()), ..Default::default() }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.system_fields().iter().all(|(_, v)| v.is_none()) && self.properties.is_empty()
    }

    fn system_fields(&self) -> [(SystemProperty, &Option<String>); 8] {
        [
            (SystemProperty::ContentType, &self.content_type),
            (SystemProperty::CorrelationId, &self.correlation_id),
            (SystemProperty::Label, &self.label),
            (SystemProperty::MessageId, &self.message_id),
            (SystemProperty::ReplyTo, &self.reply_to),
            (SystemProperty::ReplyToSessionId, &self.reply_to_session_id),
            (SystemProperty::SessionId, &self.session_id),
            (SystemProperty::To, &self.to),
        ]
    }

    pub(crate) fn matches(&self, m: &dyn FilterFields) -> bool {
        let system_ok = self.system_fields().iter().all(|(p, want)| match want {
            None => true,
            Some(want) => m.system(*p) == Some(want.as_str()),
        });
        system_ok && self.properties.iter().all(|(k, want)| m.property(k).is_some_and(|got| values_equal(got, want)))
    }
}

/// JSON equality where numbers compare by value (`1` equals `1.0`).
fn values_equal(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => match (x.as_i64(), y.as_i64()) {
            (Some(x), Some(y)) => x == y,
            _ => x.as_f64() == y.as_f64(),
        },
        _ => a == b,
    }
}

/// A parsed SQL filter expression, with the text it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct SqlFilter {
    text: String,
    expr: Expr,
}

impl SqlFilter {
    /// Parse `text`; the error says what is not supported and where.
    pub fn parse(text: &str) -> Result<SqlFilter, String> {
        let tokens = lex(text)?;
        let mut p = Parser { tokens, pos: 0 };
        let expr = p.expr()?;
        if let Some(t) = p.peek() {
            return Err(format!("unexpected {t} after the end of the expression"));
        }
        Ok(SqlFilter { text: text.to_string(), expr })
    }

    /// The expression as written.
    pub fn text(&self) -> &str {
        &self.text
    }

    pub(crate) fn matches(&self, m: &dyn FilterFields) -> bool {
        self.expr.eval(m) == Some(true)
    }
}

/// A rule action: `SET x = literal` and `REMOVE x` statements separated by `;`.
#[derive(Debug, Clone, PartialEq)]
pub struct SqlAction {
    text: String,
    statements: Vec<Statement>,
}

#[derive(Debug, Clone, PartialEq)]
enum Statement {
    Set(Target, Value),
    Remove(Target),
}

#[derive(Debug, Clone, PartialEq)]
enum Target {
    System(SystemProperty),
    User(String),
}

impl SqlAction {
    /// Parse `text`; only `SET <property> = <literal>` and `REMOVE <property>` are supported.
    pub fn parse(text: &str) -> Result<SqlAction, String> {
        let tokens = lex(text)?;
        let mut p = Parser { tokens, pos: 0 };
        let mut statements = Vec::new();
        loop {
            while p.eat(&Token::Semicolon) {}
            let Some(t) = p.next() else { break };
            let stmt = match t {
                Token::Keyword(Kw::Set) => {
                    let target = p.target()?;
                    if !p.eat(&Token::Op(CmpOp::Eq)) {
                        return Err("expected `=` after the SET target".into());
                    }
                    match p.operand()? {
                        Operand::Lit(v) => Statement::Set(target, v),
                        _ => return Err("SET supports only a literal value".into()),
                    }
                }
                Token::Keyword(Kw::Remove) => Statement::Remove(p.target()?),
                t => return Err(format!("expected SET or REMOVE, found {t}")),
            };
            statements.push(stmt);
            match p.peek() {
                None | Some(Token::Semicolon) => {}
                Some(t) => return Err(format!("unexpected {t} after a statement")),
            }
        }
        if statements.is_empty() {
            return Err("the action has no statement".into());
        }
        Ok(SqlAction { text: text.to_string(), statements })
    }

    /// The action as written.
    pub fn text(&self) -> &str {
        &self.text
    }

    pub(crate) fn apply(&self, m: &mut dyn ActionFields) {
        for s in &self.statements {
            match s {
                Statement::Set(Target::System(p), v) => m.set_system(*p, Some(literal_text(v))),
                // Names as filters read them: the exact name, else the one that differs only in case.
                Statement::Set(Target::User(name), v) => {
                    let key = property_key(m.properties(), name).unwrap_or(name).to_string();
                    m.properties_mut().insert(key, v.clone());
                }
                Statement::Remove(Target::System(p)) => m.set_system(*p, None),
                Statement::Remove(Target::User(name)) => {
                    if let Some(key) = property_key(m.properties(), name).map(str::to_string) {
                        m.properties_mut().remove(&key);
                    }
                }
            }
        }
    }
}

fn literal_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

// ---------------------------------------------------------------------------------------------
// Expression tree and evaluation

#[derive(Debug, Clone, PartialEq)]
enum Expr {
    Or(Box<Expr>, Box<Expr>),
    And(Box<Expr>, Box<Expr>),
    Not(Box<Expr>),
    Cmp(Operand, CmpOp, Operand),
    IsNull(Operand, bool),
}

#[derive(Debug, Clone, PartialEq)]
enum Operand {
    Lit(Value),
    System(SystemProperty),
    User(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CmpOp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

impl Operand {
    fn resolve(&self, m: &dyn FilterFields) -> Option<Value> {
        match self {
            Operand::Lit(v) => Some(v.clone()),
            Operand::System(p) => m.system(*p).map(|s| Value::String(s.to_string())),
            Operand::User(name) => m.property(name).filter(|v| !v.is_null()).cloned(),
        }
    }
}

impl Expr {
    /// SQL three-valued logic: `None` is unknown.
    fn eval(&self, m: &dyn FilterFields) -> Option<bool> {
        match self {
            Expr::Or(a, b) => match (a.eval(m), b.eval(m)) {
                (Some(true), _) | (_, Some(true)) => Some(true),
                (Some(false), Some(false)) => Some(false),
                _ => None,
            },
            Expr::And(a, b) => match (a.eval(m), b.eval(m)) {
                (Some(false), _) | (_, Some(false)) => Some(false),
                (Some(true), Some(true)) => Some(true),
                _ => None,
            },
            Expr::Not(a) => a.eval(m).map(|v| !v),
            Expr::IsNull(o, negated) => Some(o.resolve(m).is_none() != *negated),
            Expr::Cmp(a, op, b) => compare(&a.resolve(m)?, *op, &b.resolve(m)?),
        }
    }
}

fn compare(a: &Value, op: CmpOp, b: &Value) -> Option<bool> {
    use std::cmp::Ordering;
    let ord: Ordering = match (a, b) {
        (Value::String(x), Value::String(y)) => x.cmp(y),
        (Value::Number(x), Value::Number(y)) => match (x.as_i64(), y.as_i64()) {
            (Some(x), Some(y)) => x.cmp(&y),
            _ => x.as_f64()?.partial_cmp(&y.as_f64()?)?,
        },
        (Value::Bool(x), Value::Bool(y)) => match op {
            CmpOp::Eq => return Some(x == y),
            CmpOp::Ne => return Some(x != y),
            _ => return None,
        },
        _ => return None,
    };
    Some(match op {
        CmpOp::Eq => ord == Ordering::Equal,
        CmpOp::Ne => ord != Ordering::Equal,
        CmpOp::Lt => ord == Ordering::Less,
        CmpOp::Le => ord != Ordering::Greater,
        CmpOp::Gt => ord == Ordering::Greater,
        CmpOp::Ge => ord != Ordering::Less,
    })
}

// ---------------------------------------------------------------------------------------------
// Lexer

#[derive(Debug, Clone, PartialEq)]
enum Token {
    Str(String),
    Num(Value),
    Ident(String),
    Keyword(Kw),
    Op(CmpOp),
    LParen,
    RParen,
    Semicolon,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kw {
    And,
    Or,
    Not,
    Is,
    Null,
    True,
    False,
    Set,
    Remove,
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Token::Str(s) => write!(f, "'{s}'"),
            Token::Num(n) => write!(f, "{n}"),
            Token::Ident(s) => write!(f, "`{s}`"),
            Token::Keyword(k) => write!(f, "{}", format!("{k:?}").to_ascii_uppercase()),
            Token::Op(op) => write!(f, "`{op:?}`"),
            Token::LParen => f.write_str("`(`"),
            Token::RParen => f.write_str("`)`"),
            Token::Semicolon => f.write_str("`;`"),
        }
    }
}

fn lex(text: &str) -> Result<Vec<Token>, String> {
    let chars: Vec<char> = text.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        match c {
            c if c.is_whitespace() => i += 1,
            '(' => {
                out.push(Token::LParen);
                i += 1;
            }
            ')' => {
                out.push(Token::RParen);
                i += 1;
            }
            ';' => {
                out.push(Token::Semicolon);
                i += 1;
            }
            '=' => {
                out.push(Token::Op(CmpOp::Eq));
                i += 1;
            }
            '!' if chars.get(i + 1) == Some(&'=') => {
                out.push(Token::Op(CmpOp::Ne));
                i += 2;
            }
            '<' => match chars.get(i + 1) {
                Some('>') => {
                    out.push(Token::Op(CmpOp::Ne));
                    i += 2;
                }
                Some('=') => {
                    out.push(Token::Op(CmpOp::Le));
                    i += 2;
                }
                _ => {
                    out.push(Token::Op(CmpOp::Lt));
                    i += 1;
                }
            },
            '>' => {
                if chars.get(i + 1) == Some(&'=') {
                    out.push(Token::Op(CmpOp::Ge));
                    i += 2;
                } else {
                    out.push(Token::Op(CmpOp::Gt));
                    i += 1;
                }
            }
            '\'' => {
                let mut s = String::new();
                i += 1;
                loop {
                    match chars.get(i) {
                        None => return Err("unterminated string literal".into()),
                        Some('\'') if chars.get(i + 1) == Some(&'\'') => {
                            s.push('\'');
                            i += 2;
                        }
                        Some('\'') => {
                            i += 1;
                            break;
                        }
                        Some(c) => {
                            s.push(*c);
                            i += 1;
                        }
                    }
                }
                out.push(Token::Str(s));
            }
            '[' => {
                let end = chars[i..].iter().position(|c| *c == ']').ok_or("unterminated `[` identifier")?;
                let name: String = chars[i + 1..i + end].iter().collect();
                if name.is_empty() {
                    return Err("empty `[]` identifier".into());
                }
                out.push(Token::Ident(name));
                i += end + 1;
            }
            c if c.is_ascii_digit() || (c == '-' && chars.get(i + 1).is_some_and(char::is_ascii_digit)) => {
                let start = i;
                i += 1;
                while i < chars.len() && (chars[i].is_ascii_digit() || chars[i] == '.') {
                    i += 1;
                }
                let s: String = chars[start..i].iter().collect();
                let num = if let Ok(n) = s.parse::<i64>() {
                    Value::from(n)
                } else {
                    let f: f64 = s.parse().map_err(|_| format!("`{s}` is not a number"))?;
                    serde_json::Number::from_f64(f).map(Value::Number).ok_or_else(|| format!("`{s}` is not a number"))?
                };
                out.push(Token::Num(num));
            }
            c if c.is_ascii_alphabetic() || c == '_' => {
                let start = i;
                while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == '.') {
                    i += 1;
                }
                let word: String = chars[start..i].iter().collect();
                let kw = match word.to_ascii_uppercase().as_str() {
                    "AND" => Some(Kw::And),
                    "OR" => Some(Kw::Or),
                    "NOT" => Some(Kw::Not),
                    "IS" => Some(Kw::Is),
                    "NULL" => Some(Kw::Null),
                    "TRUE" => Some(Kw::True),
                    "FALSE" => Some(Kw::False),
                    "SET" => Some(Kw::Set),
                    "REMOVE" => Some(Kw::Remove),
                    "LIKE" | "IN" | "EXISTS" | "BETWEEN" | "ESCAPE" => {
                        return Err(format!("`{word}` is not supported by the local bus"));
                    }
                    _ => None,
                };
                out.push(kw.map_or(Token::Ident(word), Token::Keyword));
            }
            other => return Err(format!("unexpected character `{other}`")),
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Parser (recursive descent: OR < AND < NOT < comparison)

struct Parser {
    tokens: Vec<Token>,
    pos: usize,
}

impl Parser {
    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.pos)
    }

    fn next(&mut self) -> Option<Token> {
        let t = self.tokens.get(self.pos).cloned();
        self.pos += 1;
        t
    }

    fn eat(&mut self, t: &Token) -> bool {
        if self.peek() == Some(t) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    fn expr(&mut self) -> Result<Expr, String> {
        let mut left = self.and()?;
        while self.eat(&Token::Keyword(Kw::Or)) {
            left = Expr::Or(Box::new(left), Box::new(self.and()?));
        }
        Ok(left)
    }

    fn and(&mut self) -> Result<Expr, String> {
        let mut left = self.unary()?;
        while self.eat(&Token::Keyword(Kw::And)) {
            left = Expr::And(Box::new(left), Box::new(self.unary()?));
        }
        Ok(left)
    }

    fn unary(&mut self) -> Result<Expr, String> {
        if self.eat(&Token::Keyword(Kw::Not)) {
            return Ok(Expr::Not(Box::new(self.unary()?)));
        }
        if self.eat(&Token::LParen) {
            let e = self.expr()?;
            if !self.eat(&Token::RParen) {
                return Err("missing `)`".into());
            }
            return Ok(e);
        }
        let left = self.operand()?;
        match self.next() {
            Some(Token::Op(op)) => Ok(Expr::Cmp(left, op, self.operand()?)),
            Some(Token::Keyword(Kw::Is)) => {
                let negated = self.eat(&Token::Keyword(Kw::Not));
                if !self.eat(&Token::Keyword(Kw::Null)) {
                    return Err("expected NULL after IS".into());
                }
                Ok(Expr::IsNull(left, negated))
            }
            Some(t) => Err(format!("expected a comparison operator, found {t}")),
            None => Err("expected a comparison operator, found the end of the expression".into()),
        }
    }

    fn operand(&mut self) -> Result<Operand, String> {
        match self.next() {
            Some(Token::Str(s)) => Ok(Operand::Lit(Value::String(s))),
            Some(Token::Num(n)) => Ok(Operand::Lit(n)),
            Some(Token::Keyword(Kw::True)) => Ok(Operand::Lit(Value::Bool(true))),
            Some(Token::Keyword(Kw::False)) => Ok(Operand::Lit(Value::Bool(false))),
            Some(Token::Ident(name)) => Ok(match ident(&name)? {
                Target::System(p) => Operand::System(p),
                Target::User(u) => Operand::User(u),
            }),
            Some(t) => Err(format!("expected a property or a literal, found {t}")),
            None => Err("expected a property or a literal, found the end of the expression".into()),
        }
    }

    fn target(&mut self) -> Result<Target, String> {
        match self.next() {
            Some(Token::Ident(name)) => match ident(&name)? {
                Target::System(SystemProperty::MessageId | SystemProperty::SessionId) => Err(format!("an action cannot change `{name}`")),
                t => Ok(t),
            },
            Some(t) => Err(format!("expected a property name, found {t}")),
            None => Err("expected a property name".into()),
        }
    }
}

fn ident(name: &str) -> Result<Target, String> {
    match name.split_once('.') {
        Some((scope, rest)) if scope.eq_ignore_ascii_case("sys") => SystemProperty::parse(rest)
            .map(Target::System)
            .ok_or_else(|| format!("`{name}` is not a system property the local bus supports")),
        Some((scope, rest)) if scope.eq_ignore_ascii_case("user") && !rest.is_empty() => Ok(Target::User(rest.to_string())),
        // A dotted name that is not sys./user. is kept whole (a property named `a.b`).
        _ => Ok(Target::User(name.to_string())),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    struct M {
        label: Option<String>,
        id: String,
        props: BTreeMap<String, Value>,
    }

    impl FilterFields for M {
        fn system(&self, p: SystemProperty) -> Option<&str> {
            match p {
                SystemProperty::Label => self.label.as_deref(),
                SystemProperty::MessageId => Some(&self.id),
                _ => None,
            }
        }
        fn properties(&self) -> &BTreeMap<String, Value> {
            &self.props
        }
    }

    impl ActionFields for M {
        fn set_system(&mut self, p: SystemProperty, value: Option<String>) {
            if p == SystemProperty::Label {
                self.label = value;
            }
        }
        fn properties_mut(&mut self) -> &mut BTreeMap<String, Value> {
            &mut self.props
        }
    }

    fn m() -> M {
        M {
            label: Some("dev.push".into()),
            id: "123456".into(),
            props: BTreeMap::from([("userprop1".to_string(), Value::from("value1")), ("n".to_string(), Value::from(3))]),
        }
    }

    fn sql(s: &str) -> bool {
        SqlFilter::parse(s).unwrap().matches(&m())
    }

    #[test]
    fn sql_subset_evaluates_like_service_bus() {
        assert!(sql("1=1"));
        assert!(!sql("1=0"));
        assert!(sql("sys.Label = 'dev.push'"));
        assert!(sql("sys.MessageId = '123456' AND userProp1 = 'value1'"));
        assert!(sql("sys.Label = 'x' OR user.userprop1 = 'value1'"));
        assert!(!sql("sys.Label = 'x' OR missing = 'value1'"));
        assert!(!sql("NOT missing = 'a'"), "unknown stays unknown under NOT");
        assert!(sql("missing IS NULL AND n IS NOT NULL"));
        assert!(sql("n > 2 AND n <= 3 AND n <> 4"));
        assert!(sql("(sys.Label = 'dev.push') AND NOT (n = 4)"));
        assert!(sql("[userprop1] = 'value1'"));
    }

    #[test]
    fn unsupported_sql_is_rejected_with_a_reason() {
        for bad in ["sys.Label LIKE 'dev.%'", "n IN (1, 2)", "sys.Foo = 'x'", "a = ", "1=1 2", "EXISTS(a)", "'a", "a == 'b'"] {
            assert!(SqlFilter::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn actions_name_properties_as_filters_do() {
        let a = SqlAction::parse("SET UserProp1 = 'changed'; REMOVE N").unwrap();
        let mut msg = m();
        a.apply(&mut msg);
        assert_eq!(msg.props.get("userprop1"), Some(&Value::from("changed")), "the stored name is kept");
        assert!(!msg.props.contains_key("UserProp1"), "no second, differently cased property");
        assert!(!msg.props.contains_key("n"));
        let mut exact = m();
        exact.props.insert("N".into(), Value::from(1));
        SqlAction::parse("REMOVE N").unwrap().apply(&mut exact);
        assert!(!exact.props.contains_key("N") && exact.props.contains_key("n"), "an exact name wins");
    }

    #[test]
    fn actions_set_and_remove() {
        let a = SqlAction::parse("SET sys.Label = 'Entity'; SET extra = 5; REMOVE n").unwrap();
        let mut msg = m();
        a.apply(&mut msg);
        assert_eq!(msg.label.as_deref(), Some("Entity"));
        assert_eq!(msg.props.get("extra"), Some(&Value::from(5)));
        assert!(!msg.props.contains_key("n"));
        assert!(SqlAction::parse("SET a = b").is_err());
        assert!(SqlAction::parse("DROP a").is_err());
        assert!(SqlAction::parse("SET sys.MessageId = 'x'").is_err());
    }

    #[test]
    fn correlation_filters_need_every_field() {
        let mut f = CorrelationFilter::label("dev.push");
        assert!(f.matches(&m()));
        f.properties.insert("UserProp1".into(), Value::from("value1"));
        assert!(f.matches(&m()), "property names match case-insensitively");
        f.properties.insert("n".into(), Value::from(3.0));
        assert!(f.matches(&m()), "numbers compare by value");
        f.message_id = Some("other".into());
        assert!(!f.matches(&m()));
    }
}
