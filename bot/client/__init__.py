"""The Discord client: the bot object, streamed replies, and running the bot until it is stopped."""

from bot.client.chatbot import ChatBot, answer_command_error

__all__ = ["ChatBot", "answer_command_error"]
