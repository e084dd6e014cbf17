//! `:name` parameters in the allow-listed RPC queries (`agent.rpc.queries`), found the same
//! way for every engine that has no named parameters of its own: outside literals, quoted
//! identifiers and comments.

/// A query's text cut at its `:param` places.
#[derive(Debug, Clone, PartialEq)]
pub enum Piece {
    Text(String),
    Param(String),
}

/// The SQL dialect a query is written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// Dollar-quoted strings (`$$ … $$`, `$tag$ … $tag$`).
    Postgres,
    /// Bracketed identifiers (`[a:b]`, `]]` inside).
    TSql,
}

/// Splits `sql` at `:name` parameters, outside string literals, quoted identifiers,
/// dollar-quoted strings (PostgreSQL), bracketed identifiers (T-SQL), comments and `::`
/// casts.
pub fn pieces(sql: &str, dialect: Dialect) -> Vec<Piece> {
    let b: Vec<char> = sql.chars().collect();
    let mut out = Vec::new();
    let mut text = String::new();
    let mut i = 0;
    let is_ident = |c: char| c.is_ascii_alphanumeric() || c == '_';
    while i < b.len() {
        let c = b[i];
        match c {
            '\'' | '"' => {
                // Until the closing quote; a doubled quote stays inside.
                text.push(c);
                i += 1;
                while i < b.len() {
                    text.push(b[i]);
                    if b[i] == c {
                        if i + 1 < b.len() && b[i + 1] == c {
                            text.push(b[i + 1]);
                            i += 2;
                            continue;
                        }
                        break;
                    }
                    i += 1;
                }
                i += 1;
            }
            '-' if b.get(i + 1) == Some(&'-') => {
                while i < b.len() && b[i] != '\n' {
                    text.push(b[i]);
                    i += 1;
                }
            }
            '/' if b.get(i + 1) == Some(&'*') => {
                text.push_str("/*");
                i += 2;
                while i < b.len() && !(b[i] == '*' && b.get(i + 1) == Some(&'/')) {
                    text.push(b[i]);
                    i += 1;
                }
                if i < b.len() {
                    text.push_str("*/");
                    i += 2;
                }
            }
            '[' if dialect == Dialect::TSql => {
                // Until the closing `]`; a doubled `]]` stays inside.
                text.push(c);
                i += 1;
                while i < b.len() {
                    text.push(b[i]);
                    if b[i] == ']' {
                        if b.get(i + 1) == Some(&']') {
                            text.push(']');
                            i += 2;
                            continue;
                        }
                        break;
                    }
                    i += 1;
                }
                i += 1;
            }
            '$' if dialect == Dialect::Postgres => {
                // $tag$ … $tag$ (the tag may be empty); `$1` is a positional parameter.
                let mut j = i + 1;
                while j < b.len() && is_ident(b[j]) && !b[i + 1].is_ascii_digit() {
                    j += 1;
                }
                if j < b.len() && b[j] == '$' && !b.get(i + 1).is_some_and(|d| d.is_ascii_digit()) {
                    let tag: String = b[i..=j].iter().collect();
                    text.push_str(&tag);
                    i = j + 1;
                    let rest: String = b[i..].iter().collect();
                    match rest.find(&tag) {
                        Some(end) => {
                            text.push_str(&rest[..end + tag.len()]);
                            i += rest[..end + tag.len()].chars().count();
                        }
                        None => {
                            text.push_str(&rest);
                            i = b.len();
                        }
                    }
                } else {
                    text.push(c);
                    i += 1;
                }
            }
            ':' if b.get(i + 1) == Some(&':') => {
                text.push_str("::");
                i += 2;
            }
            ':' if b
                .get(i + 1)
                .is_some_and(|n| n.is_ascii_alphabetic() || *n == '_') =>
            {
                let mut j = i + 1;
                while j < b.len() && is_ident(b[j]) {
                    j += 1;
                }
                if !text.is_empty() {
                    out.push(Piece::Text(std::mem::take(&mut text)));
                }
                out.push(Piece::Param(b[i + 1..j].iter().collect()));
                i = j;
            }
            _ => {
                text.push(c);
                i += 1;
            }
        }
    }
    if !text.is_empty() {
        out.push(Piece::Text(text));
    }
    out
}

/// The configured query `name`, or the refusal naming the field: an unknown name, or a
/// parameter the query does not declare.
pub fn lookup<'a, Q>(
    queries: &'a std::collections::HashMap<String, Q>,
    name: &str,
    params: &tether_schemas::Row,
    declared: fn(&Q) -> &Vec<String>,
) -> Result<&'a Q, tether_actors::ports::QueryError> {
    use tether_actors::ports::QueryError;
    let Some(q) = queries.get(name) else {
        return Err(QueryError {
            field: Some("name".into()),
            message: format!("no query `{name}` is configured on this agent (agent.rpc.queries)"),
        });
    };
    if let Some(extra) = params.keys().find(|k| !declared(q).contains(k)) {
        return Err(QueryError {
            field: Some(format!("params.{extra}")),
            message: format!("query `{name}` takes no parameter `{extra}`"),
        });
    }
    Ok(q)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(p: &[Piece]) -> Vec<&str> {
        p.iter()
            .filter_map(|x| match x {
                Piece::Param(n) => Some(n.as_str()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn t_sql_brackets_and_n_strings_hide_colons() {
        let p = pieces(
            "SELECT [a:b], [x]]:y], N':no', '$1:no' FROM t WHERE id = :id AND m = $5 -- :no\n AND n = :n",
            Dialect::TSql,
        );
        assert_eq!(params(&p), vec!["id", "n"]);
        // The same text as PostgreSQL: brackets are not identifiers there.
        let p = pieces("SELECT arr[:lo] FROM t", Dialect::Postgres);
        assert_eq!(params(&p), vec!["lo"]);
    }
}
