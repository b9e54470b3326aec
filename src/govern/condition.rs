//! Conditions on a call's arguments and the caller's identity, written in CEL (the Common
//! Expression Language, evaluated by the `cel` crate, the continuation of `cel-interpreter`).
//!
//! A role's condition narrows what the role allows: it applies to the calls the role allows
//! whose `SOURCE/NAME` matches its glob, and such a call is allowed by that role only when every
//! matching condition evaluates to `true`. A condition that does not evaluate to a boolean (a
//! missing field, a wrong type) denies.
//!
//! Expressions are compiled once, when the configuration loads, and see these variables:
//!
//! | variable  | value |
//! |-----------|-------|
//! | `args`    | a tool's `arguments` object, a resource's `uri` string, a prompt's `arguments` object (`{}` when absent) |
//! | `tenant`  | the caller's tenant |
//! | `subject` | the caller's subject |
//! | `roles`   | the caller's roles, a list of strings |
//! | `source`  | the source called |
//! | `name`    | the tool or prompt name, or the resource URI |
//!
//! Only the first [`MAX_EXPRESSION_LEN`] bytes of an expression are accepted, and arguments
//! deeper than [`MAX_ARGS_DEPTH`] are refused, so a condition's cost stays bounded by the
//! message size limit.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock};

use cel::common::ast::{EntryExpr, Expr};
use cel::objects::Key;
use cel::{Context, Env, IdedExpr, Program, Value};
use serde_json::value::RawValue;

use super::Identity;
use super::policy::Kind;

/// The longest expression accepted, in bytes: conditions are short predicates, and a bound
/// keeps a configuration typo (a pasted file) from becoming a slow parse.
pub const MAX_EXPRESSION_LEN: usize = 4096;

/// The deepest bracket nesting (`(`, `[`, `{`) accepted in an expression's text. The `cel`
/// parser recurses through dozens of frames per bracket: about 70 nested parentheses overflowed
/// an 8 MiB stack in a debug build, and a hot reload compiles on a 2 MiB thread (found by the
/// fuzz/ `cel` target). Real conditions nest a few levels.
pub const MAX_NESTING: usize = 10;

/// The stack of the thread that parses an expression: the `cel` parser recurses once per
/// operator of a chain (`1 + 1 + ... + 1`), and a chain of 1500 overflowed a 2 MiB stack in a
/// debug build before the depth could be checked; 64 MiB of address space (touched only as
/// deep as the parse goes) covers the longest expression accepted.
const COMPILE_STACK: usize = 64 << 20;

/// The deepest parsed expression accepted (operators, calls and selections inside each other):
/// evaluation recurses once per level on the thread serving the call, so a long chain of
/// operators (`1 + 1 + ... + 1`) overflowed its stack at every call.
pub const MAX_DEPTH: usize = 32;

/// How deeply nested the arguments given to a condition may be. JSON nested deeper is refused
/// (the condition then denies): the conversion to CEL values recurses.
pub const MAX_ARGS_DEPTH: usize = 64;

/// Why an expression could not be compiled.
#[derive(Debug, thiserror::Error)]
pub enum CompileError {
    /// Longer than [`MAX_EXPRESSION_LEN`].
    #[error("the expression is longer than {MAX_EXPRESSION_LEN} bytes")]
    TooLong,
    /// Not valid CEL; the message is the parser's.
    #[error("invalid CEL expression: {0}")]
    Syntax(String),
    /// Nested deeper than [`MAX_NESTING`] brackets or [`MAX_DEPTH`] levels.
    #[error(
        "the expression nests deeper than {MAX_NESTING} brackets or {MAX_DEPTH} operators; use `in [...]` for long alternatives"
    )]
    TooDeep,
    /// The compiler thread could not start, or the parser panicked.
    #[error("the CEL compiler failed: {0}")]
    Compiler(String),
    /// Names a variable that conditions do not have.
    #[error("unknown variable {0:?} (known: args, tenant, subject, roles, source, name)")]
    UnknownVariable(String),
}

/// Why a condition could not be evaluated (the call is then denied).
#[derive(Debug, Clone, thiserror::Error)]
pub enum EvalError {
    /// The message's parameters could not be read.
    #[error("arguments unreadable: {0}")]
    Args(String),
    /// Evaluation failed (a missing field, a wrong type).
    #[error("{0}")]
    Execution(String),
    /// The expression gave something other than a boolean.
    #[error("gave {0}, not a boolean")]
    NotBoolean(String),
}

/// CEL's standard functions and macros, built once and shared by every evaluation.
static STDLIB: LazyLock<Arc<Env>> = LazyLock::new(|| Arc::new(Env::stdlib()));

/// The variables a condition may name.
const VARIABLES: &[&str] = &["args", "tenant", "subject", "roles", "source", "name"];

/// One compiled condition of a role.
#[derive(Debug)]
pub struct Condition {
    /// What it governs.
    pub kind: Kind,
    /// Glob over `SOURCE/NAME` choosing the calls it applies to.
    pub pattern: String,
    /// The expression as written (for messages and change detection).
    pub expression: String,
    program: Program,
}

impl Condition {
    /// Compiles `expression`, checking that it names only known variables.
    pub fn compile(kind: Kind, pattern: String, expression: &str) -> Result<Self, CompileError> {
        if expression.len() > MAX_EXPRESSION_LEN {
            return Err(CompileError::TooLong);
        }
        if bracket_depth(expression) > MAX_NESTING {
            return Err(CompileError::TooDeep);
        }
        let text = expression.to_owned();
        let program = std::thread::Builder::new()
            .name("cel-compile".into())
            .stack_size(COMPILE_STACK)
            .spawn(move || {
                let program = Program::compile(&text)
                    .map_err(|e| CompileError::Syntax(e.to_string().replace('\n', " ")))?;
                // A deeper program is dropped here too: dropping it recurses as well.
                if deeper_than(program.expression(), MAX_DEPTH) {
                    return Err(CompileError::TooDeep);
                }
                Ok(program)
            })
            .map_err(|e| CompileError::Compiler(e.to_string()))?
            .join()
            .map_err(|_| CompileError::Compiler("the CEL parser panicked".into()))??;
        let mut bound = Vec::new();
        comprehension_variables(program.expression(), &mut bound);
        if let Some(unknown) = program
            .references()
            .variables()
            .into_iter()
            .find(|v| !VARIABLES.contains(v) && !bound.contains(v))
        {
            return Err(CompileError::UnknownVariable(unknown.to_owned()));
        }
        Ok(Self {
            kind,
            pattern,
            expression: expression.to_owned(),
            program,
        })
    }

    /// Whether the condition applies to a call of `kind` on `target` (`SOURCE/NAME`).
    pub fn applies(&self, kind: Kind, target: &str) -> bool {
        self.kind == kind && super::policy::glob_match(&self.pattern, target)
    }

    /// Evaluates the condition for one call.
    pub fn evaluate(&self, call: &Call<'_>, args: &Value) -> Result<bool, EvalError> {
        let mut context = Context::with_env(STDLIB.clone());
        context.add_variable_from_value("args", args.clone());
        context.add_variable_from_value("tenant", call.who.tenant.to_string());
        context.add_variable_from_value("subject", call.who.subject.to_string());
        context.add_variable_from_value(
            "roles",
            Value::List(Arc::new(
                call.who
                    .roles
                    .iter()
                    .map(|r| Value::from(r.as_str()))
                    .collect(),
            )),
        );
        context.add_variable_from_value("source", call.source.to_owned());
        context.add_variable_from_value("name", call.name.to_owned());
        match self.program.execute(&context) {
            Ok(Value::Bool(b)) => Ok(b),
            Ok(other) => Err(EvalError::NotBoolean(format!("{other:?}"))),
            Err(e) => Err(EvalError::Execution(e.to_string())),
        }
    }
}

/// One call being authorized: who makes it, on what, and the JSON text of its `params`, read
/// only when a condition applies.
pub struct Call<'a> {
    /// The caller.
    pub who: &'a Identity,
    /// Tool, resource or prompt.
    pub kind: Kind,
    /// The source.
    pub source: &'a str,
    /// The tool or prompt name, or the resource URI: the field the upstream acts on.
    pub name: &'a str,
    /// The message's `params` text, as classification located it in the body (so a batch is
    /// parsed once, not once per message a condition applies to); `None` when absent.
    pub params: Option<&'a [u8]>,
}

impl Call<'_> {
    /// The `args` variable: a tool's or prompt's `arguments` (an empty map when absent), or a
    /// resource's URI (the `uri` the upstream reads, the same text policy matched).
    pub fn args(&self) -> Result<Value, EvalError> {
        if self.kind == Kind::Resource {
            return Ok(Value::from(self.name));
        }
        #[derive(serde::Deserialize)]
        struct Params<'a> {
            #[serde(borrow)]
            arguments: Option<&'a RawValue>,
        }
        let Some(params) = self.params else {
            return Ok(empty_map());
        };
        let params: Params<'_> =
            serde_json::from_slice(params).map_err(|e| EvalError::Args(e.to_string()))?;
        let Some(arguments) = params.arguments else {
            return Ok(empty_map());
        };
        let json: serde_json::Value =
            serde_json::from_str(arguments.get()).map_err(|e| EvalError::Args(e.to_string()))?;
        from_json(&json, 0)
    }
}

/// The names macros such as `exists(x, ...)` bind, anywhere in `expression`: the crate's
/// reference list counts them as variables.
fn comprehension_variables<'e>(expression: &'e IdedExpr, out: &mut Vec<&'e str>) {
    match &expression.expr {
        Expr::Comprehension(c) => {
            out.push(&c.iter_var);
            out.extend(c.iter_var2.as_deref());
            out.push(&c.accu_var);
            for part in [
                &c.iter_range,
                &c.accu_init,
                &c.loop_cond,
                &c.loop_step,
                &c.result,
            ] {
                comprehension_variables(part, out);
            }
        }
        Expr::Call(call) => {
            for part in call.target.iter().map(|t| &**t).chain(&call.args) {
                comprehension_variables(part, out);
            }
        }
        Expr::List(list) => {
            for element in &list.elements {
                comprehension_variables(element, out);
            }
        }
        Expr::Select(select) => comprehension_variables(&select.operand, out),
        Expr::Map(map) => {
            for entry in &map.entries {
                entry_walk(&entry.expr, out);
            }
        }
        Expr::Struct(s) => {
            for entry in &s.entries {
                entry_walk(&entry.expr, out);
            }
        }
        Expr::Ident(_) | Expr::Literal(_) | Expr::Unspecified => {}
    }
}

/// The deepest nesting of brackets in `text`, outside string literals (quotes of either kind,
/// backslash escapes; a triple-quoted or raw string only counts as more conservative).
fn bracket_depth(text: &str) -> usize {
    let (mut depth, mut deepest) = (0usize, 0usize);
    let mut quote = None;
    let mut bytes = text.bytes();
    while let Some(b) = bytes.next() {
        match (quote, b) {
            (Some(_), b'\\') => {
                bytes.next();
            }
            (Some(q), b) if b == q => quote = None,
            (Some(_), _) => {}
            (None, b'"' | b'\'') => quote = Some(b),
            (None, b'(' | b'[' | b'{') => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            (None, b')' | b']' | b'}') => depth = depth.saturating_sub(1),
            (None, _) => {}
        }
    }
    deepest
}

/// Whether `expression` is more than `limit` levels deep; recurses at most `limit` levels.
fn deeper_than(expression: &IdedExpr, limit: usize) -> bool {
    let Some(below) = limit.checked_sub(1) else {
        return true;
    };
    match &expression.expr {
        Expr::Comprehension(c) => [
            &c.iter_range,
            &c.accu_init,
            &c.loop_cond,
            &c.loop_step,
            &c.result,
        ]
        .into_iter()
        .any(|part| deeper_than(part, below)),
        Expr::Call(call) => call
            .target
            .iter()
            .map(|t| &**t)
            .chain(&call.args)
            .any(|part| deeper_than(part, below)),
        Expr::List(list) => list.elements.iter().any(|e| deeper_than(e, below)),
        Expr::Select(select) => deeper_than(&select.operand, below),
        Expr::Map(map) => map
            .entries
            .iter()
            .any(|e| entry_deeper_than(&e.expr, below)),
        Expr::Struct(s) => s.entries.iter().any(|e| entry_deeper_than(&e.expr, below)),
        Expr::Ident(_) | Expr::Literal(_) | Expr::Unspecified => false,
    }
}

fn entry_deeper_than(entry: &EntryExpr, limit: usize) -> bool {
    match entry {
        EntryExpr::StructField(field) => deeper_than(&field.value, limit),
        EntryExpr::MapEntry(pair) => {
            deeper_than(&pair.key, limit) || deeper_than(&pair.value, limit)
        }
    }
}

fn entry_walk<'e>(entry: &'e EntryExpr, out: &mut Vec<&'e str>) {
    match entry {
        EntryExpr::StructField(field) => comprehension_variables(&field.value, out),
        EntryExpr::MapEntry(pair) => {
            comprehension_variables(&pair.key, out);
            comprehension_variables(&pair.value, out);
        }
    }
}

fn empty_map() -> Value {
    Value::from(HashMap::<Key, Value>::new())
}

/// JSON as CEL values: integers that fit are `int`, other numbers `double`.
fn from_json(json: &serde_json::Value, depth: usize) -> Result<Value, EvalError> {
    if depth > MAX_ARGS_DEPTH {
        return Err(EvalError::Args(format!(
            "nested deeper than {MAX_ARGS_DEPTH} levels"
        )));
    }
    Ok(match json {
        serde_json::Value::Null => Value::Null,
        serde_json::Value::Bool(b) => Value::Bool(*b),
        serde_json::Value::Number(n) => match n.as_i64() {
            Some(i) => Value::Int(i),
            None => match n.as_u64() {
                Some(u) => Value::UInt(u),
                None => Value::Float(n.as_f64().unwrap_or(f64::NAN)),
            },
        },
        serde_json::Value::String(s) => Value::from(s.as_str()),
        serde_json::Value::Array(items) => Value::List(Arc::new(
            items
                .iter()
                .map(|item| from_json(item, depth + 1))
                .collect::<Result<_, _>>()?,
        )),
        serde_json::Value::Object(map) => Value::from(
            map.iter()
                .map(|(k, v)| Ok((Key::from(k.as_str()), from_json(v, depth + 1)?)))
                .collect::<Result<HashMap<Key, Value>, EvalError>>()?,
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::govern::identity::tests::who;

    fn eval(expression: &str, roles: &[&str], params: &str) -> Result<bool, EvalError> {
        let condition =
            Condition::compile(Kind::Tool, "db/*".into(), expression).expect("compiles");
        let who = who(roles);
        let call = Call {
            who: &who,
            kind: Kind::Tool,
            source: "db",
            name: "query",
            params: Some(params.as_bytes()),
        };
        condition.evaluate(&call, &call.args()?)
    }

    #[test]
    fn arguments_and_identity() {
        let rule = r#"args.table != "salaries" || "hr" in roles"#;
        let salaries = r#"{"name":"query","arguments":{"table":"salaries"}}"#;
        let orders = r#"{"name":"query","arguments":{"table":"orders"}}"#;
        assert!(eval(rule, &["analyst"], orders).expect("evaluates"));
        assert!(!eval(rule, &["analyst"], salaries).expect("evaluates"));
        assert!(eval(rule, &["analyst", "hr"], salaries).expect("evaluates"));
        let contains = r#"!args.table.contains("salar") || "hr" in roles"#;
        assert!(!eval(contains, &["analyst"], salaries).expect("evaluates"));
        assert!(
            eval(
                r#"tenant == "acme" && subject == "alice" && source == "db" && name == "query""#,
                &[],
                orders
            )
            .expect("evaluates")
        );
        assert!(eval("args.limit <= 100", &[], r#"{"arguments":{"limit":5}}"#).expect("int"));
        assert!(eval("size(args) == 0", &[], r#"{"name":"query"}"#).expect("no arguments"));
        assert!(
            eval(
                r#"roles.exists(r, r.startsWith("ana"))"#,
                &["analyst"],
                orders
            )
            .expect("a macro's own variable is not an unknown one")
        );
    }

    #[test]
    fn evaluation_errors_are_errors() {
        let missing = eval("args.table == 'x'", &[], r#"{"arguments":{}}"#);
        assert!(
            matches!(missing, Err(EvalError::Execution(_))),
            "{missing:?}"
        );
        let wrong_type = eval("args.limit > 3", &[], r#"{"arguments":{"limit":"many"}}"#);
        assert!(wrong_type.is_err(), "{wrong_type:?}");
        let not_bool = eval("args", &[], r#"{"arguments":{}}"#);
        assert!(
            matches!(not_bool, Err(EvalError::NotBoolean(_))),
            "{not_bool:?}"
        );
        let deep = format!(
            r#"{{"arguments":{{"a":{}1{}}}}}"#,
            "[".repeat(MAX_ARGS_DEPTH + 1),
            "]".repeat(MAX_ARGS_DEPTH + 1)
        );
        assert!(matches!(eval("true", &[], &deep), Err(EvalError::Args(_))));
    }

    #[test]
    fn compile_errors_name_the_problem() {
        let err = Condition::compile(Kind::Tool, "*".into(), "args.table ==").expect_err("syntax");
        assert!(matches!(err, CompileError::Syntax(_)), "{err}");
        let err =
            Condition::compile(Kind::Tool, "*".into(), "user == 'bob'").expect_err("variable");
        assert!(err.to_string().contains("\"user\""), "{err}");
        let long = "true && ".repeat(MAX_EXPRESSION_LEN) + "true";
        assert!(matches!(
            Condition::compile(Kind::Tool, "*".into(), &long),
            Err(CompileError::TooLong)
        ));
    }

    /// Runs `f` on a thread with a 2 MiB stack, as tokio's workers and blocking threads (a hot
    /// reload) have; a stack overflow aborts the test process.
    fn on_small_stack<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        std::thread::Builder::new()
            .stack_size(2 << 20)
            .spawn(f)
            .expect("spawn a thread")
            .join()
            .expect("no panic")
    }

    /// Deeply nested expressions are refused before the `cel` parser or evaluator recurses
    /// through them: 70 nested parentheses overflowed an 8 MiB stack while compiling, a chain of
    /// 1500 additions a 2 MiB one while compiling and a chain of 400 an 8 MiB one while
    /// evaluating (found by the fuzz/ `cel` target).
    #[test]
    fn deep_nesting_is_refused_and_the_deepest_accepted_runs_on_a_small_stack() {
        let nested = |n: usize| format!("{}1{} == 1", "(".repeat(n), ")".repeat(n));
        let chain = |n: usize| format!("{}1 == {}", "1 + ".repeat(n), n + 1);
        for expression in [
            nested(MAX_NESTING + 1),
            nested(2000),
            chain(MAX_DEPTH),
            chain(1000),
            format!("{}1 == 1", "1+".repeat(2000)),
            format!(
                "{}true{}",
                "[".repeat(MAX_NESTING + 1),
                "]".repeat(MAX_NESTING + 1)
            ),
        ] {
            let result = on_small_stack(move || {
                Condition::compile(Kind::Tool, "*".into(), &expression).map(|_| ())
            });
            assert!(matches!(result, Err(CompileError::TooDeep)), "{result:?}");
        }
        // Brackets inside strings do not count.
        let quoted = format!(r#"args.table != "{}""#, "(".repeat(50));
        assert!(eval(&quoted, &[], r#"{"arguments":{"table":"x"}}"#).expect("evaluates"));
        for expression in [nested(MAX_NESTING), chain(MAX_DEPTH - 2)] {
            let result = on_small_stack(move || eval(&expression, &[], r#"{"arguments":{}}"#));
            assert!(result.expect("evaluates"), "the deepest accepted evaluates");
        }
    }
}
