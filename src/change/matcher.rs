//! Which changes a pipeline takes: relations (exact, `schema.*` or `*`) and operations.

use super::Op;

/// A relation pattern from `match.relations`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RelationPattern {
    /// Exactly this relation.
    Exact(String),
    /// Every relation whose name starts with this prefix (`public.` from `public.*`).
    Prefix(String),
    /// Everything.
    All,
}

impl RelationPattern {
    /// Parse `public.orders`, `public.*` or `*`.
    pub fn parse(s: &str) -> Result<RelationPattern, String> {
        if s == "*" {
            return Ok(RelationPattern::All);
        }
        if s.is_empty() || s.contains(char::is_whitespace) {
            return Err(format!("relation {s:?} is not a name"));
        }
        match s.strip_suffix('*') {
            Some(prefix) if !prefix.contains('*') => Ok(RelationPattern::Prefix(prefix.to_string())),
            Some(_) => Err(format!("relation pattern {s:?}: only a trailing * is supported")),
            None if s.contains('*') => Err(format!("relation pattern {s:?}: only a trailing * is supported")),
            None => Ok(RelationPattern::Exact(s.to_string())),
        }
    }

    /// Does `relation` match?
    pub fn matches(&self, relation: &str) -> bool {
        match self {
            RelationPattern::Exact(r) => r == relation,
            RelationPattern::Prefix(p) => relation.starts_with(p.as_str()),
            RelationPattern::All => true,
        }
    }
}

/// A set of operations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpSet(u8);

impl OpSet {
    /// Every operation.
    pub const ALL: OpSet = OpSet(0b11111);

    fn bit(op: Op) -> u8 {
        match op {
            Op::Insert => 1,
            Op::Update => 2,
            Op::Delete => 4,
            Op::Truncate => 8,
            Op::Read => 16,
        }
    }

    /// From a list of ops.
    pub fn from_ops(ops: impl IntoIterator<Item = Op>) -> OpSet {
        OpSet(ops.into_iter().fold(0, |acc, op| acc | Self::bit(op)))
    }

    /// Membership.
    pub fn contains(self, op: Op) -> bool {
        self.0 & Self::bit(op) != 0
    }

    /// Names, for the plan.
    pub fn names(self) -> Vec<&'static str> {
        [Op::Insert, Op::Update, Op::Delete, Op::Truncate, Op::Read]
            .into_iter()
            .filter(|o| self.contains(*o))
            .map(Op::as_str)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns() {
        assert!(RelationPattern::parse("public.*").unwrap().matches("public.orders"));
        assert!(!RelationPattern::parse("public.*").unwrap().matches("audit.orders"));
        assert!(RelationPattern::parse("*").unwrap().matches("x"));
        assert!(RelationPattern::parse("pub*lic.x").is_err());
        let s = OpSet::from_ops([Op::Insert, Op::Delete]);
        assert!(s.contains(Op::Insert) && !s.contains(Op::Update));
        assert_eq!(s.names(), vec!["insert", "delete"]);
    }
}
