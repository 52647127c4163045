//! Group-limited placement: whole expert groups on one host, then placement within each host.

use super::{BalanceError, LayerPlacement, place_layer};

/// Places with `groups` contiguous expert groups kept whole on hosts of `gpus_per_host` GPUs.
pub fn place_grouped(
    loads: &[f64],
    slots: &[usize],
    gpus_per_host: usize,
    groups: usize,
) -> Result<LayerPlacement, BalanceError> {
    let hosts = slots.len() / gpus_per_host.max(1);
    if hosts <= 1 || groups <= 1 || !loads.len().is_multiple_of(groups) {
        return place_layer(loads, slots);
    }
    let per_group = loads.len() / groups;
    let group_load: Vec<f64> = (0..groups)
        .map(|g| loads[g * per_group..(g + 1) * per_group].iter().sum())
        .collect();
    // Groups to hosts: heaviest first onto the lightest host with room for another group.
    let cap = groups.div_ceil(hosts);
    let mut host_load = vec![0.0f64; hosts];
    let mut host_groups: Vec<Vec<usize>> = vec![Vec::new(); hosts];
    let mut order: Vec<usize> = (0..groups).collect();
    order.sort_by(|&a, &b| group_load[b].total_cmp(&group_load[a]).then(a.cmp(&b)));
    for g in order {
        let h = (0..hosts)
            .filter(|&h| host_groups[h].len() < cap)
            .min_by(|&a, &b| host_load[a].total_cmp(&host_load[b]).then(a.cmp(&b)))
            .unwrap_or(0);
        host_load[h] += group_load[g];
        host_groups[h].push(g);
    }
    let mut gpus: Vec<Vec<(u32, f64)>> = vec![Vec::new(); slots.len()];
    for (h, gs) in host_groups.iter().enumerate() {
        let experts: Vec<usize> = gs
            .iter()
            .flat_map(|&g| g * per_group..(g + 1) * per_group)
            .collect();
        let sub_loads: Vec<f64> = experts.iter().map(|&e| loads[e]).collect();
        let range = h * gpus_per_host..(h + 1) * gpus_per_host;
        let sub = place_layer(&sub_loads, &slots[range.clone()])?;
        for (i, g) in range.enumerate() {
            gpus[g] = sub.gpus[i]
                .iter()
                .map(|&(e, s)| (experts[e as usize] as u32, s))
                .collect();
        }
    }
    Ok(LayerPlacement { gpus })
}
