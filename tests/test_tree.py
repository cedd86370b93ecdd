"""Token trees: construction, ancestry masks, depths and paths."""

import pytest
import torch

from tandem.tree import TokenTree, ancestor_mask, chain, from_paths, path_to, tree_depths


def test_chain_is_a_width_one_tree():
    tree = chain(7, [1, 2, 3])
    assert tree.tokens == (7, 1, 2, 3)
    assert tree.parents == (-1, 0, 1, 2)
    assert tree.depths == [0, 1, 2, 3]
    assert ancestor_mask(tree.parents, "cpu").equal(torch.ones(4, 4, dtype=torch.bool).tril())


def test_from_paths_merges_shared_prefixes():
    tree = from_paths(5, [[1, 2, 3], [1, 2, 4], [6]])
    assert tree.tokens == (5, 1, 2, 3, 4, 6)
    assert tree.parents == (-1, 0, 1, 2, 2, 0)
    assert tree.children(2) == [3, 4]
    assert path_to(tree.parents, 4) == [0, 1, 2, 4]
    assert tree.path_tokens(path_to(tree.parents, 4)) == [5, 1, 2, 4]


def test_from_paths_respects_the_node_budget():
    tree = from_paths(5, [[1, 2, 3], [4, 5]], max_nodes=4)
    assert len(tree) == 5
    assert tree.tokens == (5, 1, 2, 3, 4)


def test_ancestor_mask_of_a_branching_tree():
    parents = torch.tensor([-1, 0, 0, 1, 1, 2])
    mask = ancestor_mask(parents, "cpu")
    expected = {0: {0}, 1: {0, 1}, 2: {0, 2}, 3: {0, 1, 3}, 4: {0, 1, 4}, 5: {0, 2, 5}}
    for i, seen in expected.items():
        assert set(mask[i].nonzero().flatten().tolist()) == seen
    assert tree_depths(parents) == [0, 1, 1, 2, 2, 2]


@pytest.mark.parametrize(
    "tokens,parents",
    [([1, 2], [0, 0]), ([1, 2, 3], [-1, 2, 0]), ([1, 2], [-1, -1]), ([1], [-1, 0])],
)
def test_malformed_trees_are_refused(tokens, parents):
    with pytest.raises(ValueError):
        TokenTree(torch.tensor(tokens), torch.tensor(parents))
