"""What a promotion leaves behind: the approval, the outcome, the model card and the champion history."""
