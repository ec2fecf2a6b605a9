//! The values authd writes, each prefixed with its generation: `<generation>|<kind>[|…]`.
//! ("No such user" is not among them: it is remembered in process, see `profile_cache`.)
//!
//! | kind | session key | profile key |
//! |---|---|---|
//! | `S\|<json>` | a copy of the session | |
//! | `R` | tombstone: revoked (in any generation) | |
//! | `P\|<version>\|<json>` | | a copy of the profile |
//! | `F\|<version>` | | floor: the profile is at least at this version; read PostgreSQL |
//! | `L\|<id>` | lease of a fill in flight | lease of a fill in flight |
//!
//! The Lua scripts that write them are here too, so the format lives in one file. Each touches
//! one key, so every one of them runs on a Redis Cluster.
use std::sync::LazyLock;

use fred::types::scripts::Script;

/// A value as read back, borrowed from the reply.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Value<'a> {
    Session(u64, &'a str),
    Tombstone,
    Profile(u64, &'a str),
    Floor,
    /// A lease, or anything unreadable: as good as absent.
    Other,
}

pub(super) fn decode(raw: &str) -> Value<'_> {
    let Some((generation, rest)) = raw.split_once('|') else {
        return Value::Other;
    };
    let Ok(generation) = generation.parse::<u64>() else {
        return Value::Other;
    };
    match rest.split_once('|') {
        None if rest == "R" => Value::Tombstone,
        Some(("S", json)) => Value::Session(generation, json),
        Some(("P", rest)) => match rest.split_once('|') {
            Some((_version, json)) => Value::Profile(generation, json),
            None => Value::Other,
        },
        Some(("F", _)) => Value::Floor,
        _ => Value::Other,
    }
}

pub(super) fn session(generation: u64, json: &str) -> String {
    format!("{generation}|S|{json}")
}

pub(super) fn tombstone(generation: u64) -> String {
    format!("{generation}|R")
}

pub(super) fn profile(generation: u64, version: i64, json: &str) -> String {
    format!("{generation}|P|{version}|{json}")
}

pub(super) fn lease(generation: u64, id: u64) -> String {
    format!("{generation}|L|{id}")
}

/// KEYS: the key. ARGV: generation, lease value, TTL ms, whether a same-generation floor may be
/// replaced (`1` for profiles). Takes the lease unless the key holds a tombstone, or a value of
/// this or a newer generation (someone else's copy or lease). 1 when taken.
pub(super) static LEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::from_lua(
        "local v = redis.call('GET', KEYS[1])
         if v then
           local g, kind = string.match(v, '^(%d+)|(%a)')
           if kind == 'R' then return 0 end
           if g then
             g = tonumber(g)
             local mine = tonumber(ARGV[1])
             if g > mine then return 0 end
             if g == mine and not (kind == 'F' and ARGV[4] == '1') then return 0 end
           end
         end
         redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
         return 1",
    )
});

/// KEYS: the key. ARGV: expected value, new value, TTL ms. Writes only while the key still holds
/// the expected value (the caller's lease, or the copy it refreshes). 1 when written.
pub(super) static SWAP: LazyLock<Script> = LazyLock::new(|| {
    Script::from_lua(
        "if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
         redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
         return 1",
    )
});

/// KEYS: the key. ARGV: expected value. Deletes the key only while it holds that value (a lease
/// whose fill has nothing to write). 1 when deleted.
pub(super) static RELEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::from_lua(
        "if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
         return redis.call('DEL', KEYS[1])",
    )
});

/// KEYS: the key. ARGV: value prefix (`<generation>|S|`), new value, TTL ms. Replaces a live copy
/// of that generation, nothing else (a touch must not recreate a flushed or revoked key).
pub(super) static REFRESH: LazyLock<Script> = LazyLock::new(|| {
    Script::from_lua(
        "local v = redis.call('GET', KEYS[1])
         if not v or string.sub(v, 1, #ARGV[1]) ~= ARGV[1] then return 0 end
         redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
         return 1",
    )
});

/// KEYS: a session key. Deletes a copy of the session or a fill's lease (any generation), so
/// that neither the copy nor a fill that read PostgreSQL before is served again; a tombstone
/// stays. 1 when deleted. Argued in the protocol model by inclusion: its `RedisFlush` empties a
/// key's slot at any point, tombstones included, and the revocation and profile promises hold in
/// every state it reaches; this empties a slot only when it holds a copy or a lease, so it reaches
/// no state a flush does not (see `auth::email`).
pub(super) static FORGET: LazyLock<Script> = LazyLock::new(|| {
    Script::from_lua(
        "local v = redis.call('GET', KEYS[1])
         if not v or not string.match(v, '^%d+|[SL]|') then return 0 end
         return redis.call('DEL', KEYS[1])",
    )
});

/// KEYS: a profile key. ARGV: the writer's generation (0 if none), version, profile JSON (empty:
/// write a floor), TTL ms. Replaces an older version, a "not found" or a lease, in the generation
/// the key holds: with the full profile when that is the writer's generation, else as a floor.
/// An absent key stays absent (its newer state may have been flushed; the next read fills it),
/// and a newer version is never lowered. 1 when written.
pub(super) static RAISE: LazyLock<Script> = LazyLock::new(|| {
    Script::from_lua(
        "local v = redis.call('GET', KEYS[1])
         if not v then return 0 end
         local g, kind, ver = string.match(v, '^(%d+)|(%a)|?(%d*)')
         if not g then
           redis.call('DEL', KEYS[1])
           return 1
         end
         local version = tonumber(ARGV[2])
         if (kind == 'P' or kind == 'F') and (tonumber(ver) or 0) >= version then return 0 end
         if g == ARGV[1] and ARGV[3] ~= '' then
           redis.call('SET', KEYS[1], g .. '|P|' .. ARGV[2] .. '|' .. ARGV[3], 'PX', ARGV[4])
         else
           redis.call('SET', KEYS[1], g .. '|F|' .. ARGV[2], 'PX', ARGV[4])
         end
         return 1",
    )
});

/// KEYS: one key, for routing. ARGV: keys *of that key's node*, in any slots. Their values, in
/// order (nil where absent): an MGET that a Redis Cluster accepts across slots. (Redis 7 lets a
/// script flagged `allow-cross-slot-keys` read keys of other slots of its node, as long as they
/// are not declared in KEYS.)
pub(super) static GET_MANY: LazyLock<Script> = LazyLock::new(|| {
    Script::from_lua(
        "#!lua flags=no-writes,allow-cross-slot-keys
         local values = {}
         for i, key in ipairs(ARGV) do values[i] = redis.call('GET', key) end
         return values",
    )
});

/// KEYS: a user's session index. ARGV: member, TTL s.
pub(super) static INDEX: LazyLock<Script> = LazyLock::new(|| {
    Script::from_lua(
        "redis.call('SADD', KEYS[1], ARGV[1])
         redis.call('EXPIRE', KEYS[1], ARGV[2])
         return 1",
    )
});

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_round_trip() {
        assert_eq!(decode(&session(7, "{}")), Value::Session(7, "{}"));
        assert_eq!(decode(&tombstone(0)), Value::Tombstone);
        assert_eq!(
            decode(&profile(3, 12, "{\"a\":\"|\"}")),
            Value::Profile(3, "{\"a\":\"|\"}")
        );
        assert_eq!(decode("4|F|9"), Value::Floor);
        assert_eq!(decode(&lease(4, 99)), Value::Other);
        for garbage in ["", "x", "|S|{}", "12", "12|", "a|R", "1|Q|x", "1|P|nojson"] {
            assert_eq!(decode(garbage), Value::Other, "{garbage:?}");
        }
    }
}
