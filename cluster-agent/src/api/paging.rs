//! Pages of list calls (`page_size`, `page_token` → `next_page_token`, as in Google's
//! AIP-158): a list is ordered by a unique key, a page token is the key of the last item
//! of the page before, so pages stay consistent while items come and go between calls.
//! Clients treat tokens as opaque; an empty `next_page_token` means the last page.

use std::str::FromStr;

use tonic::Status;

/// Items per page when the request leaves `page_size` at 0.
pub const PAGE_SIZE_DEFAULT: usize = 500;
/// The most items a page holds; a larger `page_size` is refused.
pub const PAGE_SIZE_MAX: usize = 1000;

const TOKEN_PREFIX: &str = "after:";

/// The page of `items` that `page_size` and `page_token` ask for, ordered by `key`
/// (unique per item), and the token of the next page ("" after the last one).
pub fn page<T, K>(
    mut items: Vec<T>,
    key: impl Fn(&T) -> K,
    page_size: u32,
    page_token: &str,
) -> Result<(Vec<T>, String), Status>
where
    K: Ord + ToString + FromStr,
{
    let size = self::page_size(page_size)?;
    let after = token_key::<K>(page_token)?;
    items.sort_by_key(|t| key(t));
    if let Some(after) = &after {
        items.retain(|t| key(t) > *after);
    }
    let more = items.len() > size;
    items.truncate(size);
    let next = match items.last() {
        Some(last) if more => token(key(last)),
        _ => String::new(),
    };
    Ok((items, next))
}

/// The items per page a request's `page_size` asks for (0: the default; too large:
/// refused).
pub fn page_size(page_size: u32) -> Result<usize, Status> {
    match page_size as usize {
        0 => Ok(PAGE_SIZE_DEFAULT),
        n if n > PAGE_SIZE_MAX => Err(Status::invalid_argument(format!(
            "page_size {n} exceeds the maximum of {PAGE_SIZE_MAX}"
        ))),
        n => Ok(n),
    }
}

/// The key a `page_token` names (`None` for the first page), or a refusal.
pub fn token_key<K: FromStr>(page_token: &str) -> Result<Option<K>, Status> {
    if page_token.is_empty() {
        return Ok(None);
    }
    page_token
        .strip_prefix(TOKEN_PREFIX)
        .and_then(|k| k.parse::<K>().ok())
        .map(Some)
        .ok_or_else(|| {
            Status::invalid_argument(format!(
                "page_token {page_token:?} is not one this list returned; \
                 start again with an empty page_token"
            ))
        })
}

/// The token of the page after the item whose key is `key`.
pub fn token(key: impl ToString) -> String {
    format!("{TOKEN_PREFIX}{}", key.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_follow_the_key_and_end_with_an_empty_token() {
        let items: Vec<u64> = (1..=7).rev().collect();
        let (p1, t1) = page(items.clone(), |v| *v, 3, "").unwrap_or_default();
        assert_eq!(p1, [1, 2, 3]);
        let (p2, t2) = page(items.clone(), |v| *v, 3, &t1).unwrap_or_default();
        assert_eq!(p2, [4, 5, 6]);
        let (p3, t3) = page(items.clone(), |v| *v, 3, &t2).unwrap_or_default();
        assert_eq!((p3, t3.as_str()), (vec![7], ""));
        let (all, t) = page(items, |v| *v, 0, "").unwrap_or_default();
        assert_eq!((all.len(), t.as_str()), (7, ""));
    }

    #[test]
    fn a_bad_token_or_size_is_refused() {
        let e = page(vec![1u64], |v| *v, 0, "after:x").expect_err("a bad token");
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        let e = page(vec![1u64], |v| *v, 0, "7").expect_err("no prefix");
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        let e = page(vec![1u64], |v| *v, 5000, "").expect_err("too large");
        assert!(e.message().contains("1000"), "{e}");
    }
}
