//! Class labels on the command line: ids or names (ImageNet names for 1000-class models, or the
//! names a checkpoint carries in its metadata).

/// The 1000 ImageNet-1k class names in index order (underscores for spaces).
pub fn imagenet_names() -> Vec<&'static str> {
    include_str!("data/imagenet_classes.txt").lines().collect()
}

fn norm(s: &str) -> String {
    s.trim().to_lowercase().replace([' ', '-'], "_")
}

/// Parses `"207,360"` or `"golden retriever,otter"` (mixing is fine) into class ids.
pub fn parse_classes(spec: &str, num_classes: usize, names: &[String]) -> anyhow::Result<Vec<u32>> {
    let mut out = Vec::new();
    for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        if let Ok(id) = item.parse::<i64>() {
            anyhow::ensure!(
                id >= 0 && (id as usize) < num_classes,
                "--class {id} out of range: the model has classes 0..{}",
                num_classes.saturating_sub(1)
            );
            out.push(id as u32);
            continue;
        }
        let want = norm(item);
        let hits: Vec<usize> = names
            .iter()
            .enumerate()
            .filter(|(_, n)| norm(n) == want)
            .map(|(i, _)| i)
            .collect();
        match hits.as_slice() {
            [one] => out.push(*one as u32),
            [] if names.is_empty() => anyhow::bail!(
                "--class '{item}': this model has no class names; use ids 0..{}",
                num_classes.saturating_sub(1)
            ),
            [] => anyhow::bail!("--class '{item}': no class of that name (see `dydit classes`)"),
            many => anyhow::bail!("--class '{item}' is ambiguous: ids {many:?}; use an id"),
        }
    }
    anyhow::ensure!(
        !out.is_empty(),
        "--class needs at least one class id or name"
    );
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn ids_and_names() {
        let names: Vec<String> = imagenet_names().iter().map(|s| s.to_string()).collect();
        assert_eq!(names.len(), 1000);
        assert_eq!(
            parse_classes("207,360", 1000, &names).unwrap(),
            vec![207, 360]
        );
        assert_eq!(
            parse_classes("golden retriever, Otter", 1000, &names).unwrap(),
            vec![207, 360]
        );
        assert!(parse_classes("1000", 1000, &names)
            .unwrap_err()
            .to_string()
            .contains("out of range"));
        assert!(parse_classes("-1", 1000, &names).is_err());
        assert!(parse_classes("crane", 1000, &names)
            .unwrap_err()
            .to_string()
            .contains("ambiguous"));
        assert!(parse_classes("unicornfish", 1000, &names).is_err());
    }
}
